"""The demo's notes: computed from a method's config and what it measured, never from its name."""

from __future__ import annotations

import pytest

import patchattn
from patchattn import demo


def test_fields_that_cover_the_text_explain_a_dense_row():
    hyper = patchattn.get_config("hyper")  # min_seq_len 4096: shorter calls run exact attention
    names = [text.split("=")[0] for text, _ in demo.covering_fields(hyper, 2048)]
    assert names == ["min_seq_len"]
    assert demo.covering_fields(hyper, 8192) == []
    s2 = patchattn.get_config("s2", local_blocks=32, block_size=64)  # a 2048-token local window
    (field,) = demo.covering_fields(s2, 2048)
    assert field[0].startswith("local_blocks=32 = 2048 tokens") and field[1] == 2048
    assert demo.covering_fields(s2, 2049) == []


def _row(method, category, ppl, density, **overrides):
    return {"method": method, "category": category, "ppl": ppl, "density": density,
            "_config": patchattn.get_config(method, **overrides)}


def test_row_notes():
    dense_row = _row("hyper", "sparse", 10.0, 1.0)
    note = demo.row_note(dense_row, 2048, dense_ppl=10.0)
    assert "runs dense here" in note and "min_seq_len=4096" in note and "above 4096" in note
    assert demo.row_note(_row("hyper", "sparse", 10.5, 0.4, min_seq_len=0), 2048, dense_ppl=10.0) is None
    tuned = demo.row_note(_row("moh", "moh", 46.0, None), 2048, dense_ppl=10.0)
    assert "x4.6" in tuned and "fine-tune" in tuned
    assert demo.row_note({"method": "x", "category": "sparse", "error": "boom"}, 2048, 10.0) is None


def test_methods_that_need_tuning_are_named_as_skipped():
    skipped = [s.name for s in patchattn.list_methods() if s.needs_finetune]
    note = demo.skipped_note()
    assert all(name in note for name in skipped) if skipped else note is None
    assert not any(s.name in skipped for s in demo.demo_methods())


def test_the_demo_runs_language_model_methods_only_and_names_the_others():
    others = [s.name for s in patchattn.list_methods() if "llm" not in s.families]
    assert "gna" in others  # a DiT-only method exists, so the filter is exercised
    assert all("llm" in s.families for s in demo.demo_methods())
    assert all(name in demo.skipped_note() for name in others)
    with pytest.raises(ValueError, match="gna"):
        demo.demo_methods(["gna"])
