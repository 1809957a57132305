"""``patchattn bench linear`` on the CPU at tiny shapes (the Lightning kernel runs its chunked torch path)."""

import csv
import json

import pytest
import torch

from patchattn.bench import linear, methods
from patchattn.methods import _lightning

TINY = ["--device", "cpu", "--dtype", "float32", "--heads", "4,2", "--head-dim", "16", "--lengths", "64,128",
        "--decode-lengths", "64,128", "--paper-lengths", "64"]


def test_bench_linear_writes_every_row_and_the_environment(tmp_path):
    out = tmp_path / "linear.csv"
    assert linear.main([*TINY, "--methods", "lightning;landmark;dma", "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    seen = {(r["mode"], r["method"], int(r["T"])) for r in rows}
    for T in (64, 128):
        assert {("kernel", "lightning-kernel", T), ("kernel-bwd", "lightning-kernel", T),
                ("prefill-bwd", "lightning", T), ("decode-kernel", "lightning-kernel", T)} <= seen
        assert {(m, name, T) for m in ("prefill", "decode") for name in ("lightning", "landmark", "dma")} <= seen
    assert ("paper", "lightning-kernel", 64) in seen
    assert not any(r["mode"] == "prefill-bwd" and r["method"] != "lightning" for r in rows)  # linear methods only
    assert all(r["note"] == "" and float(r["ms"]) > 0 and float(r["sdpa_ms"]) > 0 for r in rows), rows
    assert next(r for r in rows if r["mode"] == "paper")["B"] == "4"
    meta = json.loads((tmp_path / "linear.json").read_text())
    assert meta["command"].startswith("python -m patchattn.bench.linear") and "commit" in meta


def test_a_failing_row_is_a_note_and_the_run_goes_on(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(linear, "lightning_attention", broken)
    out = tmp_path / "linear.csv"
    assert linear.main([*TINY, "--modes", "kernel,prefill", "--methods", "dma", "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [(r["mode"], r["method"]) for r in rows] == [("kernel", "lightning-kernel"), ("prefill", "dma")] * 2
    assert all(r["note"] == "failed: RuntimeError: kernel exploded" for r in rows if r["mode"] == "kernel")
    assert all(r["note"] == "" and float(r["ms"]) > 0 for r in rows if r["mode"] == "prefill")


def test_lightning_decode_step_continues_the_state_and_matches_the_full_forward(monkeypatch):
    """The timed decode step reads only the new key (the kept state covers the rest) and gives the last row of a
    forward over the whole sequence."""
    torch.manual_seed(0)
    module = linear.method_layer("lightning", {}, (4, 2), 16, torch.device("cpu"))
    q_all, k, v = linear.qkv(1, (4, 2), 40, 16, torch.device("cpu"), torch.float32)
    q = q_all[:, :, -1:]
    mapped = []
    real_map = _lightning.feature_map
    monkeypatch.setattr(_lightning, "feature_map", lambda state, x, which, *dtype: mapped.append(x.shape[2]) or
                        real_map(state, x, which, *dtype))
    step = linear._decode_step("lightning", module, q, k, v)
    mapped.clear()
    out = step()
    assert mapped == [1, 1]  # the new key and the new query only
    full = linear.method_layer("lightning", {}, (4, 2), 16, torch.device("cpu"))
    with torch.no_grad():
        whole = linear.call_layer("lightning", full, torch.cat([q_all[:, :, :-1], q], 2), k, v)
    torch.testing.assert_close(out[:, -1], whole[:, -1], rtol=1e-4, atol=1e-5)


def test_unknown_modes_and_methods_are_refused():
    with pytest.raises(SystemExit):
        linear.main([*TINY, "--modes", "warp"])
    with pytest.raises(ValueError, match="Known methods"):
        linear.main([*TINY, "--methods", "no_such_method"])


def test_bench_methods_points_whole_attention_methods_here(capsys):
    assert methods.main(["--methods", "landmark;dma"]) == 2
    assert "patchattn bench linear" in capsys.readouterr().err


def test_bench_generate_runs_hybrid_and_lightning_on_dynamic_and_static_caches(tmp_path):
    """The end-to-end command of bench/linear/reproduce.sh, at the tiny CPU shape (hybrid: 1 softmax layer of 2): a
    row per method and cache, no errors, the static cache's tokens those of the dynamic cache."""
    from patchattn.bench import generate

    out = tmp_path / "generate.csv"
    assert generate.main(["--shape", "tiny", "--layers", "2", "--device", "cpu", "--dtype", "float32", "--lengths",
                          "64", "--methods", 'dense;hybrid:{"softmax_every":2};lightning', "--caches", "dynamic,static", "--new-tokens", "1,4",
                          "--repeats", "1", "--csv", str(out)]) == 0
    lines = out.read_text().splitlines()
    rows = list(csv.DictReader(lines[1:]))
    assert [(r["method"], r["cache"]) for r in rows] == [(m, c) for m in ("dense", "hybrid", "lightning")
                                                         for c in ("dynamic", "static")]
    assert [r["tokens_equal_dynamic"] for r in rows if r["cache"] == "static"] == ["1/1"] * 3
    assert all(r["error"] == "" and r["decode_ms_per_step"] and r["tokens_hash"] for r in rows), rows  # no timing


def test_sdpa_without_gqa_repeats_the_kv_heads_and_says_so(monkeypatch):
    real = torch.nn.functional.scaled_dot_product_attention

    def no_gqa(q, k, v, **kwargs):
        if kwargs.pop("enable_gqa", False):
            raise RuntimeError("No available kernel")
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(linear.F, "scaled_dot_product_attention", no_gqa)
    q, k, v = linear.qkv(1, (4, 2), 32, 8, torch.device("cpu"), torch.float32, grad=True)
    fn, inputs, note = linear.sdpa_fn(q, k, v, torch.device("cpu"))
    assert "repeated" in note and inputs[1].shape[1] == 4 and inputs[1].requires_grad
    expected = real(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(fn(), expected)
    linear.backward_of(fn, inputs)()
    assert all(x.grad is not None for x in inputs)
