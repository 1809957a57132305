"""Padded batches equal their rows run alone, for every method (property test over random pad patterns).

Each case draws a batch size, row lengths and a padding side from a seeded generator, runs the padded batch
through a tiny Llama patched with a setting at which the method really is sparse (``tests/pin_cases.py``), and
compares every real position's logits -- prefill, and the scores of a few greedy decode steps under left padding --
with the same row run alone.  Position ids follow the mask, as ``generate`` computes them.
"""

from __future__ import annotations

import os
import random
import warnings

import pytest
import torch

import patchattn
from patchattn.api import mean_stat
from patchattn.testing import tiny_model
from pin_cases import PIN_CASES, method_of

TOLERANCE = 2e-5
NEW_TOKENS = 3
CASES_PER_METHOD = 6 if os.environ.get("PATCHATTN_SLOW") else 2
CASES = [(case, seed) for case in [*PIN_CASES, "dense"] for seed in range(CASES_PER_METHOD)]


def _draw(seed: int) -> tuple[list[int], list[int], int]:
    """(row lengths, left pads, width): 1-4 rows of 1-150 tokens; one layout in three also pads on the right."""
    rng = random.Random(seed * 7919 + 17)
    lengths = [rng.randint(1, 150) for _ in range(rng.randint(1, 4))]
    width = max(lengths) + rng.choice([0, 0, rng.randint(1, 40)])
    both_sides = rng.random() < 1 / 3
    lefts = [rng.randint(0, width - n) if both_sides else width - n for n in lengths]
    return lengths, lefts, width


def _batch(rows: list[torch.Tensor], lefts: list[int], width: int):
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (row, left) in enumerate(zip(rows, lefts)):
        ids[i, left:left + len(row)] = row
        mask[i, left:left + len(row)] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _overrides(case: str) -> dict:
    return PIN_CASES.get(case, {})


@pytest.mark.parametrize("case,seed", CASES, ids=[f"{c}-{s}" for c, s in CASES])
def test_padded_rows_equal_rows_alone(case, seed):
    lengths, lefts, width = _draw(seed)
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, 100, (n,), generator=gen) for n in lengths]
    ids, mask, positions = _batch(rows, lefts, width)
    model = tiny_model("llama")
    with torch.no_grad(), patchattn.patched(model, method_of(case), **_overrides(case)):
        batch = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        for i, (row, left) in enumerate(zip(rows, lefts)):
            alone = model(input_ids=row[None]).logits[0]
            diff = (batch[i, left:left + len(row)] - alone).abs().max().item()
            assert diff < TOLERANCE, f"row {i} (length {len(row)}, left pad {left}, width {width}): {diff:.2e}"


DECODE_CASES = [(case, seed) for case, seed in CASES if seed == 0]


@pytest.mark.parametrize("case,seed", DECODE_CASES, ids=[f"{c}-{s}" for c, s in DECODE_CASES])
def test_left_padded_generate_equals_rows_alone(case, seed):
    """Greedy decoding of a left-padded batch (as batched ``generate`` pads): every step's scores equal each row's
    own, including a row that is padding only."""
    gen = torch.Generator().manual_seed(100 + seed)
    lengths = [130, 77, 1]
    rows = [torch.randint(3, 100, (n,), generator=gen) for n in lengths]
    width = 150
    ids, mask, _ = _batch(rows, [width - n for n in lengths], width)
    ids, mask = torch.cat([ids, torch.zeros(1, width, dtype=torch.long)]), torch.cat([mask, torch.zeros(1, width, dtype=torch.long)])
    model = tiny_model("llama")
    settings = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "pad_token_id": 0, "output_scores": True,
                "return_dict_in_generate": True}
    with torch.no_grad(), patchattn.patched(model, method_of(case), **_overrides(case)):
        batch = model.generate(input_ids=ids, attention_mask=mask, **settings)
        scores = torch.stack(batch.scores, dim=1)  # [B, steps, vocab]
        assert torch.isfinite(scores).all()
        for i, row in enumerate(rows):
            alone = model.generate(input_ids=row[None], **settings)
            assert torch.equal(batch.sequences[i, width:], alone.sequences[0, len(row):]), f"row {i}"
            diff = (scores[i] - torch.stack(alone.scores, dim=1)[0]).abs().max().item()
            assert diff < TOLERANCE, f"row {i} (length {len(row)}): decode scores differ by {diff:.2e}"


@pytest.mark.parametrize("method", ["longlora", "sinklora"])
def test_training_attention_on_a_padded_batch_equals_rows_alone(method):
    """The grouped training attentions (train_only=False: the training path at eval, so dropout stays off) form
    their groups from each row's first token, and the loss backpropagates through the row groups."""
    lengths, lefts, width = [96, 64, 32], [0, 20, 50], 96  # group sizes a quarter of each: even
    gen = torch.Generator().manual_seed(7)
    rows = [torch.randint(3, 100, (n,), generator=gen) for n in lengths]
    ids, mask, positions = _batch(rows, lefts, width)
    model = tiny_model("llama")
    with patchattn.patched(model, method, backend="torch", train_only=False):
        batch = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        assert 0 < mean_stat(model, "density") < 1  # the grouped attention ran, not dense
        batch[mask.bool()].square().mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        with torch.no_grad():
            for i, (row, left) in enumerate(zip(rows, lefts)):
                alone = model(input_ids=row[None]).logits[0]
                diff = (batch[i, left:left + len(row)].detach() - alone).abs().max().item()
                assert diff < TOLERANCE, f"{method} row {i} (length {len(row)}, left pad {left}): {diff:.2e}"


STATIC_CASES = [*PIN_CASES, "dense"]


@pytest.mark.parametrize("case", STATIC_CASES)
def test_static_cache_generates_what_the_default_cache_does(case):
    """A static cache (``generate(cache_implementation="static")``) has empty slots after the newest token: its
    prefill comes without a mask, its decode steps with one hiding those slots.  The method must read the same keys
    as with the default cache, sparse (no dense fallback), on a padded batch."""
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 150), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :40] = 0
    settings = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "pad_token_id": 0, "output_scores": True,
                "return_dict_in_generate": True}
    with torch.no_grad(), patchattn.patched(model, method_of(case), **_overrides(case)):
        dynamic = model.generate(input_ids=ids, attention_mask=mask, **settings)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            static = model.generate(input_ids=ids, attention_mask=mask, cache_implementation="static", **settings)
    assert torch.equal(static.sequences, dynamic.sequences)
    diff = max((a - b).abs().max().item() for a, b in zip(static.scores, dynamic.scores))
    assert diff < TOLERANCE
    assert not [w for w in caught if "run dense attention" in str(w.message)]
