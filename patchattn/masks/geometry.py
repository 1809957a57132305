"""Where query blocks and key blocks sit relative to each other.

Queries are aligned to the *end* of the keys (prefill: Tq == Tk; decoding with a KV cache: Tq small), so query
row ``i`` is at key position ``i + Tk - Tq``.  Block patterns are defined on the key block that holds a query
block's last position (its *diagonal* block) and on the first key position any of its rows can see.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class BlockGeometry:
    q_len: int
    kv_len: int
    block_q: int
    block_k: int
    # Derived, set once when built: a method reads them several times per call, in every layer of every decode step
    # (a property would run each time).  Not compared nor hashed: the four fields above fix them.
    n_q: int = field(init=False, repr=False, compare=False)  # query blocks
    n_k: int = field(init=False, repr=False, compare=False)  # key blocks
    offset: int = field(init=False, repr=False, compare=False)  # key position of query row 0

    def __post_init__(self):
        object.__setattr__(self, "n_q", math.ceil(self.q_len / self.block_q))
        object.__setattr__(self, "n_k", math.ceil(self.kv_len / self.block_k))
        object.__setattr__(self, "offset", self.kv_len - self.q_len)

    def first_position(self, device=None) -> torch.Tensor:
        """``[NQ]`` key position of each query block's first row."""
        return torch.arange(self.n_q, device=device) * self.block_q + self.offset

    def last_position(self, device=None) -> torch.Tensor:
        """``[NQ]`` key position of each query block's last row."""
        rows = torch.clamp((torch.arange(self.n_q, device=device) + 1) * self.block_q, max=self.q_len) - 1
        return rows + self.offset

    def diagonal_block(self, device=None) -> torch.Tensor:
        """``[NQ]`` index of the key block holding each query block's last position."""
        return torch.div(self.last_position(device), self.block_k, rounding_mode="floor")

    def key_blocks(self, device=None) -> torch.Tensor:
        """``[1, NK]`` key block indices, for broadcasting against ``[NQ, 1]`` query-side tensors."""
        return torch.arange(self.n_k, device=device)[None, :]

    def prefill_aligned(self) -> BlockGeometry:
        """A decode call's geometry widened back to its query block's start, so a decoded token reads the blocks its
        query block reads in a full forward (banded patterns: the block's first row sets the window's lower end)."""
        if self.n_q != 1:
            return self
        widened = BlockGeometry(self.q_len + self.offset % self.block_q, self.kv_len, self.block_q, self.block_k)
        return widened if widened.n_q == 1 and widened.q_len <= self.kv_len else self


@dataclass(frozen=True)
class RowGeometry:
    """A decode step (one query per row) over rows of different lengths, known only on the device: a static cache's
    rows, or a padded batch's.  ``lengths`` ``[B]``: each row's real keys, the query being the last; block ids count
    from each row's first real key; ``capacity``: keys in the tensor (host), which bounds every row; ``starts``
    ``[B]``: where each row's first real key sits in the tensor (None: at 0), for methods that read the keys."""

    lengths: torch.Tensor
    capacity: int
    block_q: int
    block_k: int
    starts: torch.Tensor | None = None
    # Lists already built by other layers of the same eager forward, by plan (``once``).
    shared: dict | None = field(default=None, compare=False, repr=False)

    def once(self, plan: tuple, build):
        """``build()``, shared by every layer of an eager forward that asks with the same ``plan`` (each layer's own
        in a compiled step, where nothing outlives the graph)."""
        if self.shared is None or torch.compiler.is_compiling():
            return build()
        if plan not in self.shared:
            self.shared[plan] = build()
        return self.shared[plan]

    @property
    def n_k(self) -> int:
        """Key blocks of the longest possible row (host): the width of lists sized by the capacity."""
        return math.ceil(self.capacity / self.block_k)

    def _column(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, 1, 1)  # [B, 1, 1]: broadcasts against heads and list entries

    def diagonal_block(self) -> torch.Tensor:
        """``[B, 1, 1]`` the block holding each row's query (-1 for an empty row)."""
        return self._column(torch.div(self.lengths - 1, self.block_k, rounding_mode="floor"))

    def first_position(self) -> torch.Tensor:
        """``[B, 1, 1]`` first position of the query's block, as ``BlockGeometry.prefill_aligned`` widens a decode
        call: a decoded token reads what its query block reads in a full forward."""
        return self._column(torch.div(self.lengths - 1, self.block_q, rounding_mode="floor") * self.block_q)

    def row_blocks(self) -> torch.Tensor:
        """``[B, 1, 1]`` key blocks of each row."""
        return self._column(torch.div(self.lengths + self.block_k - 1, self.block_k, rounding_mode="floor"))

    def geometry(self) -> BlockGeometry:
        """The longest row's host geometry (what a method's per-length budget reads)."""
        return BlockGeometry(1, self.capacity, self.block_q, self.block_k)
