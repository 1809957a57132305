"""Sliding-window layers under context-parallel prefill (two CPU processes, gloo) equal the one-process patched
prefill: Gemma 2 (windows of 8 on alternate layers, soft-capped logits) and Gemma 3 (two window layers, one full),
with every exchange, a padded batch, and decoding from the gathered cache (whose window layers keep the prompt's
last tokens, as after a one-process prefill).

The window (8) is shorter than a block (16), so a chunk that read its whole causal prefix on a window layer, or
missed the keys its window reaches on another rank, would differ."""

from __future__ import annotations

import pytest
import torch

from .cp_cases import (
    METHODS,
    PROMPT,
    assert_real_close,
    cache_kwarg,
    cache_of,
    generate_position_ids,
    padded_prompt,
    prompt,
    run_two_ranks,
)

STEPS = 3


def windowed(family: str):
    """The tiny model of ``family``; Mistral given a window of 24 on every layer (its tiny config has none)."""
    from patchattn.testing import tiny_model

    model = tiny_model(family, seed=0)
    if family == "mistral":
        model.config.sliding_window = 24  # read at each call (the layers' kwarg, the mask, the cache's layers)
    return model


def patched(family: str, method: str):
    import patchattn

    model = windowed(family)
    patchattn.patch(model, method, **{**METHODS[method], "backend": "torch"})
    return model


def _check_prefill(rank: int, family: str, methods: tuple, exchange: str, pad: bool) -> None:
    from patchattn.distributed import context_parallel

    ids, mask = padded_prompt() if pad else (prompt(), torch.ones(2, PROMPT, dtype=torch.long))
    with torch.no_grad():
        dense = windowed(family)(ids, attention_mask=mask).logits
        unwindowed = windowed(family)
        unwindowed.config.sliding_window = 4 * PROMPT  # the window layers then read their whole prefix
        for layer in unwindowed.model.layers:
            layer.self_attn.sliding_window = getattr(layer.self_attn, "sliding_window", None) and 4 * PROMPT
        full = unwindowed(ids, attention_mask=mask).logits
    assert (full - dense).abs()[mask.bool()].max() > 1e-3, "the windows change nothing at this length"
    for method in methods:
        model = patched(family, method)
        with torch.no_grad():
            oracle = model(ids, attention_mask=mask).logits
            cp = context_parallel(model, exchange=exchange)
            whole = cp.gather(cp(ids, attention_mask=mask).logits)
        what = f"{family} {method} ({exchange}{', padded' if pad else ''}) rank {rank}"
        if method != "dense":
            assert (oracle - dense).abs()[mask.bool()].max() > 1e-3, f"{what}: reads every block"
        assert_real_close(whole, oracle, mask, what)


def _check_generate(rank: int, family: str, methods: tuple) -> None:
    from patchattn.distributed import context_parallel

    ids, mask = padded_prompt()
    for method in methods:
        model = patched(family, method)
        with torch.no_grad():
            want = model.generate(ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False)[:, PROMPT:]
            cp = context_parallel(model)
            out = cp(ids, attention_mask=mask, position_ids=generate_position_ids(mask), use_cache=True)
            first = cp.gather(out.logits)[:, -1].argmax(-1, keepdim=True)
            cache = cp.gather_cache(cache_of(out))
            window = [layer for layer in cache.layers if getattr(layer, "is_sliding", False)]
            assert window and all(layer.keys.shape[2] == layer.sliding_window - 1 for layer in window)
            got = model.generate(torch.cat([ids, first], 1), attention_mask=torch.cat([mask, mask[:, -1:]], 1),
                                 **cache_kwarg(model, cache), max_new_tokens=STEPS - 1, do_sample=False)
        assert torch.equal(got[:, PROMPT:], want), f"{family} {method} rank {rank}: generate differs"


def _check_all(rank: int) -> None:
    _check_prefill(rank, "gemma2", ("dense", "hip", "streaming"), "allgather", False)
    _check_prefill(rank, "gemma3_text", ("dense", "blocktopk", "moa"), "ring", False)
    _check_prefill(rank, "gemma3_text", ("dense",), "ring_attention", True)
    _check_prefill(rank, "gemma2", ("hip",), "allgather", True)
    _check_prefill(rank, "mistral", ("dense",), "ring", True)  # every layer windowed: a sparse method runs dense
    _check_generate(rank, "gemma3_text", ("dense", "hip"))
    _check_generate(rank, "mistral", ("dense",))


def test_sliding_window_layers_equal_one_process():
    # One pair of processes for every case (each start costs seconds).
    run_two_ranks(_check_all)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_window_attention_is_the_band_tile_by_tile(softcap):
    # Queries are the last 40 of 100 keys (GQA 4:2), window 9, tiles of 7 queries (the last one short).
    from patchattn.distributed.window import window_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, t, 8, generator=gen) for h, t in ((4, 40), (2, 100), (2, 100)))
    scores = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * 8 ** -0.5
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    visible = torch.ones(40, 100, dtype=torch.bool).tril(60) & ~torch.ones(40, 100, dtype=torch.bool).tril(60 - 9)
    want = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v.repeat_interleave(2, dim=1)
    got = window_attention(q, k, v, window=9, scaling=8 ** -0.5, softcap=softcap, tile=7)
    assert torch.allclose(got, want.transpose(1, 2), atol=1e-5)
    # keys given from the window's first position on: the same rows
    assert torch.allclose(window_attention(q, k[:, :, 52:], v[:, :, 52:], window=9, scaling=8 ** -0.5,
                                           softcap=softcap, tile=7), got, atol=1e-6)
