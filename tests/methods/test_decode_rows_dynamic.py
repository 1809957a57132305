"""Device decode steps (``decode_rows``) of the dynamic selections: ``blocktopk``, ``hip``, ``hyper``.

A decode step with a mask (a static cache's empty slots, a left-padded batch) gives each row's real keys as
``KeyBounds``; the method selects among each row's own blocks on the device, keeping its compressed key cache (block
means, bucket counts) and hip's reused lists in buffers updated in place.  Checked here on the tiny Llama: (1) a
left-padded batch decoded over a static cache reads, row by row, what each row reads alone with the default cache
(whose decode steps take the host path), (2) ``generate`` gives the same tokens with a static cache as with the
default one, (3) the static-cache decode step compiles whole (``fullgraph=True``) and gives the eager step's logits.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import DynamicCache, StaticCache

import patchattn
from patchattn.testing import tiny_model

SMALL = {"block_size": 16, "backend": "torch"}
CASES = {
    # one local block: a block the rows just left is scored from the means updated in place
    "blocktopk": ("blocktopk", {**SMALL, "top_k": 2, "local_blocks": 1}),
    "blocktopk_group": ("blocktopk", {**SMALL, "top_k": 3, "mass": 1.0, "per_head": False, "score": "mean"}),
    # refresh every 3 steps: the steps in between reuse each row's lists
    "hip": ("hip", {**SMALL, "top_k": 2, "dense_layers": [], "refresh_interval": 3}),
    "hyper": ("hyper", {**SMALL, "min_seq_len": 0, "lsh_blocks": 2, "sample_size": 16, "local_blocks": 1,
                        "ties": "lowest"}),
}
TOLERANCE = 2e-5
STEPS = 5
# 10, 9 and 7 blocks of 16 (4-6 read), odd lengths, rows starting late; each row starts a block while decoding
LENGTHS = [158, 142, 109]


def _rows(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 100, (n,), generator=gen) for n in LENGTHS]


def _step_tokens(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 100, (STEPS, batch, 1), generator=torch.Generator().manual_seed(seed))


def _left_padded(rows: list[torch.Tensor], width: int):
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return ids, mask


def _rows_state(model):
    """The first layer's between-call state of the row decode (its ``built`` flag says it ran)."""
    kept = model.model.layers[0].self_attn.patchattn.method_state
    return kept.key_buckets if hasattr(kept, "key_buckets") else kept.row_means


class StaticDecode:
    """A left-padded batch over a static cache: its prefill, then decode steps with a 2-D mask as long as the cache
    (the empty slots after each row's newest key are hidden by causality, as ``generate`` does)."""

    def __init__(self, model, rows: list[torch.Tensor], capacity: int):
        self.model, self.width = model, max(len(r) for r in rows)
        ids, mask = _left_padded(rows, self.width)
        self.mask = torch.cat([mask, torch.ones(len(rows), capacity - self.width, dtype=torch.long)], dim=1)
        self.cache = StaticCache(config=model.config, max_cache_len=capacity)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.next_position = positions[:, -1:] + 1
        self.prefill_logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                    past_key_values=self.cache, use_cache=True).logits[:, -1]
        self.length = self.width

    def step(self, tokens: torch.Tensor, fn=None) -> torch.Tensor:
        fn = fn or decode_step
        logits = fn(self.model, tokens, self.mask, self.next_position, self.cache,
                    torch.tensor([self.length]))
        self.length += 1
        self.next_position = self.next_position + 1
        return logits


def decode_step(model, tokens, mask, positions, cache, cache_position):
    return model(input_ids=tokens, attention_mask=mask, position_ids=positions, past_key_values=cache,
                 cache_position=cache_position, use_cache=True).logits[:, -1]


def _alone(model, row: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
    """The row alone with the default cache (no mask: its decode steps take the host path): each step's logits."""
    cache = DynamicCache()
    out = [model(input_ids=row[None], past_key_values=cache, use_cache=True).logits[0, -1]]
    for step in tokens:
        out.append(model(input_ids=step, past_key_values=cache, use_cache=True).logits[0, -1])
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_padded_static_decode_reads_each_row_alone(case):
    method, settings = CASES[case]
    model = tiny_model("llama")
    rows = _rows()
    tokens = _step_tokens(len(rows))
    with torch.no_grad(), patchattn.patched(model, method, **settings), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = StaticDecode(model, rows, capacity=max(LENGTHS) + STEPS + 21)  # empty slots after every row
        batch = [run.prefill_logits] + [run.step(step) for step in tokens]
        assert _rows_state(model).built  # the steps ran on the device path
        for i, row in enumerate(rows):
            alone = _alone(model, row, tokens[:, i:i + 1])
            for t, (got, want) in enumerate(zip(batch, alone)):
                diff = (got[i] - want).abs().max().item()
                assert diff < TOLERANCE, f"row {i} (length {len(row)}), step {t}: {diff:.2e}"
    assert not [w for w in caught if "run dense attention" in str(w.message)]


@pytest.mark.parametrize("case", list(CASES))
def test_static_cache_generates_the_default_cache_tokens(case):
    """Batch of one, no padding: the default cache's decode steps take the host path (no mask), the static cache's
    the device path; the greedy tokens agree (8 steps: hip reuses and refreshes its lists, and the row starts a
    block)."""
    method, settings = CASES[case]
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 153), generator=torch.Generator().manual_seed(5))
    args = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad(), patchattn.patched(model, method, **settings):
        dynamic = model.generate(input_ids=ids, **args)
        static = model.generate(input_ids=ids, cache_implementation="static", **args)
        assert _rows_state(model).built
    assert torch.equal(static, dynamic)


@pytest.mark.parametrize("case", ["blocktopk", "hip", "hyper"])
def test_static_decode_step_compiles_whole_and_matches_eager(case):
    """``torch.compile(fullgraph=True)`` of a static-cache decode step on a left-padded batch (no host read, static
    shapes): the first step builds the compressed key cache, the next ones update it in place; every step's logits
    are the eager steps'."""
    method, settings = CASES[case]
    model = tiny_model("llama")
    rows = _rows()[:2]
    tokens = _step_tokens(len(rows))[:4]
    torch._dynamo.reset()
    compiled = torch.compile(decode_step, fullgraph=True, backend="eager")
    with torch.no_grad(), patchattn.patched(model, method, **settings):
        eager_run = StaticDecode(model, rows, capacity=176)
        eager = [eager_run.step(step) for step in tokens]
        compiled_run = StaticDecode(model, rows, capacity=176)  # a new prefill: the row state is rebuilt
        got = [compiled_run.step(step, compiled) for step in tokens]
    for t, (a, b) in enumerate(zip(got, eager)):
        assert (a - b).abs().max().item() < TOLERANCE, f"step {t}"


@pytest.mark.parametrize("case", list(CASES))
def test_left_padded_generate_with_the_default_cache_reads_each_row_alone(case):
    """The default cache on a left-padded batch: its decode steps come with a mask (the device path) over keys that
    grow every step (the row buffers widen when the cache starts a block); every step's scores are each row's own."""
    method, settings = CASES[case]
    model = tiny_model("llama")
    rows = _rows(seed=2)
    ids, mask = _left_padded(rows, max(LENGTHS))
    args = {"max_new_tokens": STEPS, "do_sample": False, "pad_token_id": 0, "output_scores": True,
            "return_dict_in_generate": True}
    with torch.no_grad(), patchattn.patched(model, method, **settings):
        batch = model.generate(input_ids=ids, attention_mask=mask, **args)
        assert _rows_state(model).built
        for i, row in enumerate(rows):
            alone = model.generate(input_ids=row[None], **args)
            assert torch.equal(batch.sequences[i, ids.shape[1]:], alone.sequences[0, len(row):]), f"row {i}"
            diff = max((a[i] - b[0]).abs().max().item() for a, b in zip(batch.scores, alone.scores))
            assert diff < TOLERANCE, f"row {i} (length {len(row)}): {diff:.2e}"
