"""Context-parallel prefill with the ring exchanges on two CPU processes (gloo) equals the one-process prefill:
``ring`` (shards passed round, chunks computed as their keys arrive) for the sparse methods and ``density=``, and
``ring_attention`` (shards dropped after use, partial outputs merged by log-sum-exp) for ``dense``.  Same oracle
and prompt as test_context_parallel.py."""

from __future__ import annotations

from .cp_cases import check_prefill, run_two_ranks


def _check_cases(rank: int, cases: tuple) -> None:
    for case in cases:
        check_prefill(rank, *case)


def test_ring_contiguous_split_density_and_ring_attention_equal_one_process():
    # One pair of processes for every case (each start costs seconds).  density= maps to the method's fields at
    # the prompt's length, not at each chunk's.
    density = {"hip": dict(top_k=10, density=0.5), "streaming": dict(window=1024, density=0.4)}
    run_two_ranks(_check_cases, ((("dense", "hip", "blocktopk", "streaming"), "contiguous", "ring", {}),
                                 (("hip", "streaming"), "zigzag", "ring", density),
                                 (("dense",), "zigzag", "ring_attention", {}),
                                 (("dense",), "contiguous", "ring_attention", {})))
