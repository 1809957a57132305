"""Which prompt tokens each rank prefills: a load-balanced split of the query blocks for causal attention.

Query block ``i`` of a causal prefill reads ``i + 1`` key blocks, so a contiguous split gives the last rank most of
the work.  ``zigzag`` walks the blocks from both ends at once (0, n-1, 1, n-2, ...: a block and its mirror read
``n + 1`` blocks together) and cuts that order where the running work reaches each rank's share, so each rank holds
one front run and one back run of blocks and the ranks' causal work differs by at most one block row (``n``
block pairs).  ``contiguous`` is the plain split, for comparison.  Chunks are whole blocks of the method's block
size (the prompt's last block may be partial), so each chunk's query blocks are the blocks a one-process prefill
has and its selection sees the same block geometry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BALANCES = ("zigzag", "contiguous")


@dataclass(frozen=True)
class ShardPlan:
    """The token chunks of each rank for one prompt.

    Attributes:
        tokens: the prompt's length.
        block: the block size the chunks are aligned to.
        chunks: per rank, its ``(start, stop)`` token ranges in increasing order (a rank's local tokens are these
            ranges, concatenated).
    """

    tokens: int
    block: int
    chunks: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def world(self) -> int:
        return len(self.chunks)

    def local_length(self, rank: int) -> int:
        return sum(stop - start for start, stop in self.chunks[rank])

    @property
    def max_local_length(self) -> int:
        return max(self.local_length(r) for r in range(self.world))

    def positions(self, rank: int, device=None) -> torch.Tensor:
        """``[T_local]`` the prompt positions of ``rank``'s tokens (its rotary positions), in local order."""
        parts = [torch.arange(start, stop, device=device) for start, stop in self.chunks[rank]]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)

    def tails(self, rank: int, reach: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt positions, local indices) ``[n]`` of ``rank``'s tokens among the last ``reach`` of each of its
        chunks: all that a band reaching ``reach`` keys back from a later chunk's start can read of this rank (a
        sliding-window layer's exchange; a band longer than a chunk reads the tails of several)."""
        positions, local, offset = [], [], 0
        for start, stop in self.chunks[rank]:
            first = max(start, stop - reach)
            positions.append(torch.arange(first, stop))
            local.append(torch.arange(first, stop) - start + offset)
            offset += stop - start
        return torch.cat(positions), torch.cat(local)

    def gather_index(self, device=None) -> torch.Tensor:
        """``[T]`` for prompt position ``p``: where it sits in the ranks' local tokens laid end to end, each rank
        padded to ``max_local_length`` (the layout an all-gather of padded local tensors returns)."""
        index = torch.empty(self.tokens, dtype=torch.long)
        width = self.max_local_length
        for rank in range(self.world):
            index[self.positions(rank)] = rank * width + torch.arange(self.local_length(rank))
        return index.to(device)

    def causal_work(self, rank: int) -> int:
        """Causal (query block, key block) pairs ``rank`` computes: block ``i`` reads ``i + 1`` key blocks."""
        return sum(block_rows_work(start // self.block, math.ceil(stop / self.block))
                   for start, stop in self.chunks[rank])


def block_rows_work(first: int, stop: int) -> int:
    """Causal block pairs of query blocks ``[first, stop)``: ``sum(i + 1)``."""
    return (stop * (stop + 1) - first * (first + 1)) // 2


def plan_shards(tokens: int, world: int, block: int, balance: str = "zigzag") -> ShardPlan:
    """Split a prompt of ``tokens`` tokens over ``world`` ranks in whole blocks of ``block`` tokens.

    Every rank gets at least one block; a prompt of fewer blocks than ranks raises a ValueError (run it in one
    process)."""
    if balance not in BALANCES:
        raise ValueError(f"balance must be one of {', '.join(BALANCES)}; got {balance!r}")
    if world < 1 or block < 1 or tokens < 1:
        raise ValueError(f"need tokens, world and block >= 1; got tokens={tokens}, world={world}, block={block}")
    n = math.ceil(tokens / block)
    if n < world:
        raise ValueError(f"a prompt of {tokens} tokens is {n} blocks of {block}: context parallelism over {world} "
                         f"ranks needs at least {world} blocks (one per rank); run it in one process")
    blocks = _zigzag_blocks(n, world) if balance == "zigzag" else _contiguous_blocks(n, world)
    chunks = tuple(tuple((start * block, min(stop * block, tokens)) for start, stop in _runs(owned))
                   for owned in blocks)
    return ShardPlan(tokens, block, chunks)


def _contiguous_blocks(n: int, world: int) -> list[list[int]]:
    bounds = [round(r * n / world) for r in range(world + 1)]
    return [list(range(bounds[r], bounds[r + 1])) for r in range(world)]


def _zigzag_blocks(n: int, world: int) -> list[list[int]]:
    """The blocks in the order 0, n-1, 1, n-2, ..., cut where the running causal work is nearest each rank's share
    (each rank keeps at least one block)."""
    order = [i // 2 if i % 2 == 0 else n - 1 - i // 2 for i in range(n)]
    running, total = [0], n * (n + 1) // 2
    for b in order:
        running.append(running[-1] + b + 1)
    cuts = [0]
    for r in range(1, world):
        target = r * total / world
        lo, hi = cuts[-1] + 1, n - (world - r)  # leave one block at least for each rank after this one
        cuts.append(min(range(lo, hi + 1), key=lambda c: abs(running[c] - target)))
    cuts.append(n)
    return [sorted(order[cuts[r]:cuts[r + 1]]) for r in range(world)]


def _runs(blocks: list[int]) -> list[tuple[int, int]]:
    """Sorted block indices -> ``(start, stop)`` runs of consecutive blocks."""
    runs: list[tuple[int, int]] = []
    for b in blocks:
        if runs and runs[-1][1] == b:
            runs[-1] = (runs[-1][0], b + 1)
        else:
            runs.append((b, b + 1))
    return runs
