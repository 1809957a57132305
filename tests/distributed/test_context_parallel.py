"""Context-parallel prefill on two CPU processes (gloo) equals the one-process prefill, method by method.

Oracle: the same patched model's ordinary prefill on the whole prompt, in each process.  The prompt (133 tokens,
blocks of 16) ends in a partial block; the tiny Llama has GQA; each sparse method is set to read a strict subset
of the blocks (checked: its logits differ from dense), so a chunk that selected differently would show.
"""

from __future__ import annotations

import torch

from .cp_cases import METHODS, patched_tiny_llama, prompt, run_two_ranks

ATOL = 2e-5


def _check_prefill(rank: int, methods: tuple, balance: str, exchange: str, overrides: dict) -> None:
    import patchattn
    from patchattn.distributed import context_parallel
    from patchattn.testing import tiny_model

    ids = prompt()
    dense_model = tiny_model("llama", seed=0)
    with torch.no_grad():
        dense = dense_model(ids).logits
    for method in methods:
        model = patched_tiny_llama(method, **overrides.get(method, {}))
        with torch.no_grad():
            oracle = model(ids).logits
            cp = context_parallel(model, balance=balance, exchange=exchange)
            local = cp(ids).logits
            whole = cp.gather(local)
        if method != "dense":  # the method is sparse here: a wrong selection would change the logits
            assert (oracle - dense).abs().max() > 1e-3, f"{method} reads every block at this length"
        positions = cp.positions
        assert local.shape[1] == positions.numel() < ids.shape[1]
        err = (local - oracle[:, positions]).abs().max().item()
        assert err < ATOL, f"{method} ({balance}, {exchange}) rank {rank}: max |cp - one process| = {err:.2e}"
        assert torch.allclose(whole, oracle, atol=ATOL), f"{method}: gathered logits differ"
        patchattn.unpatch(model)
        with torch.no_grad():  # the prefill left the model as it was
            assert torch.equal(model(ids).logits, dense)


def _check_cases(rank: int, cases: tuple) -> None:
    for case in cases:
        _check_prefill(rank, *case)


def test_all_gather_zigzag_equals_one_process_for_each_method():
    run_two_ranks(_check_prefill, tuple(METHODS), "zigzag", "allgather", {})


def test_ring_contiguous_split_and_density_equal_one_process():
    # One pair of processes for both cases (each start costs seconds).  density= maps to the method's fields at
    # the prompt's length, not at each chunk's.
    density = {"hip": dict(top_k=10, density=0.5), "streaming": dict(window=1024, density=0.4)}
    run_two_ranks(_check_cases, ((("dense", "hip", "blocktopk", "streaming"), "contiguous", "ring", {}),
                                 (("hip", "streaming"), "zigzag", "ring", density)))
