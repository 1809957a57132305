"""Padded batches under context-parallel prefill (two CPU processes, gloo) equal the one-process patched prefill on
every real token, method by method; decoding from the gathered cache continues as one-process ``generate`` does.

Oracle: the same patched model's ordinary forward on the whole padded batch (its rows run on their real tokens,
``methods/_rows.py``).  Rows of different real lengths, neither a multiple of the block size; the tiny Llama has
GQA; each sparse method reads a strict subset of a row's blocks (checked against dense)."""

from __future__ import annotations

import torch

from .cp_cases import (
    METHODS,
    PROMPT,
    assert_real_close,
    cache_kwarg,
    cache_of,
    generate_position_ids,
    padded_prompt,
    patched_tiny_llama,
    run_two_ranks,
)

STEPS = 3


def _check_prefill(rank: int, methods: tuple, right: bool, exchange: str) -> None:
    from patchattn.distributed import context_parallel
    from patchattn.testing import tiny_model

    ids, mask = padded_prompt(right=right)
    with torch.no_grad():
        dense = tiny_model("llama", seed=0)(ids, attention_mask=mask).logits
    for method in methods:
        model = patched_tiny_llama(method)
        with torch.no_grad():
            oracle = model(ids, attention_mask=mask).logits
            cp = context_parallel(model, exchange=exchange)
            local = cp(ids, attention_mask=mask).logits
            whole = cp.gather(local)
            index = cp.row_positions(ids.shape[0])  # where each local token sits in its row
            unmasked = cp.gather(cp(ids).logits)
        what = f"{method} ({'right' if right else 'left'} padding, {exchange}) rank {rank}"
        if method != "dense":  # sparse on the padded row too: a selection counted from the padding would show
            assert (oracle - dense).abs()[mask.bool()].max() > 1e-3, f"{what}: reads every block"
        assert local.shape[1] == index.shape[1] < PROMPT
        assert_real_close(local, oracle.gather(1, index[..., None].expand(-1, -1, oracle.shape[-1])),
                           mask.gather(1, index), what)
        assert_real_close(whole, oracle, mask, what + " (gathered)")
        # left padding: without the mask the padded row reads its padding (right padding is after every real
        # query, so causal methods may not notice)
        assert right or (unmasked - oracle).abs()[mask.bool()].max() > 1e-3, f"{what}: the padding changes nothing"


def _check_generate(rank: int, methods: tuple) -> None:
    from patchattn.distributed import context_parallel

    ids, mask = padded_prompt()
    for method in methods:
        model = patched_tiny_llama(method)
        with torch.no_grad():
            want = model.generate(ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False)[:, PROMPT:]
            oracle = model(ids, attention_mask=mask, position_ids=generate_position_ids(mask)).logits
            cp = context_parallel(model)
            out = cp(ids, attention_mask=mask, position_ids=generate_position_ids(mask), use_cache=True)
            logits = cp.gather(out.logits)
            cache = cp.gather_cache(cache_of(out))
            first = logits[:, -1].argmax(-1, keepdim=True)
            got = model.generate(torch.cat([ids, first], 1), attention_mask=torch.cat([mask, mask[:, -1:]], 1),
                                 **cache_kwarg(model, cache), max_new_tokens=STEPS - 1, do_sample=False)
        assert_real_close(logits, oracle, mask, f"{method} generate's prefill rank {rank}")
        assert torch.equal(got[:, PROMPT:], want), f"{method} rank {rank}: generate differs after the padded prefill"


def _check_all(rank: int) -> None:
    _check_prefill(rank, tuple(METHODS), False, "allgather")
    _check_prefill(rank, ("dense", "hip", "streaming"), True, "ring")
    _check_prefill(rank, ("dense",), False, "ring_attention")
    _check_generate(rank, ("hip", "blocktopk", "streaming", "dense"))


def test_padded_batches_equal_one_process_and_generate_continues():
    # One pair of processes for every case (each start costs seconds).
    run_two_ranks(_check_all)
