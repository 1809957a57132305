"""Static block patterns (they depend only on positions), each written once as the *runs* of one query block's row.

A row of a static pattern is a few ascending, disjoint runs of key blocks: contiguous runs (sinks, a window, the
local blocks), strided runs (S2's shards) and power-of-two distances (PowerAttention).  ``*_runs`` computes them
from the query block's diagonal block (and first position) with plain arithmetic, so the same function serves

* prefill: with ``[NQ, 1]`` tensors, ``runs_mask`` gives the bool ``[.., NQ, NK]`` mask (cached per shape);
* decoding: with host integers for the one query block, ``runs_lists`` gives its block lists with a few
  element-wise kernels and no host sync; the runs are hashable, so the methods memoise the lists per plan
  (``methods._sparse.memo_decode_lists``): steps within one key block launch nothing to build them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .geometry import BlockGeometry


def _minimum(a, b):
    """``min`` of host integers (decoding: plain Python, no tensor), ``torch.minimum`` once a tensor is involved."""
    if isinstance(a, int) and isinstance(b, int):
        return a if a < b else b
    return torch.minimum(torch.as_tensor(a), torch.as_tensor(b))


def _maximum(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return a if a > b else b
    return torch.maximum(torch.as_tensor(a), torch.as_tensor(b))


class Run(NamedTuple):
    """Key blocks ``lo, lo + step, lo + 2 step, ...`` below ``hi`` (``step`` 1: a contiguous run).  A tuple: with
    host integers it is hashed as (part of) a memo key on every decode step, so it must be cheap to build and hash;
    ``kind`` keeps it apart from a ``PowerRun`` of the same numbers."""

    lo: int | torch.Tensor
    hi: int | torch.Tensor
    step: int = 1
    kind: str = "run"

    def members(self, j: torch.Tensor) -> torch.Tensor:
        inside = (j >= self.lo) & (j < self.hi)
        return inside if self.step == 1 else inside & ((j - self.lo) % self.step == 0)

    def count(self):
        span = self.hi - self.lo
        if torch.is_tensor(span):
            return torch.div(span + self.step - 1, self.step, rounding_mode="floor").clamp(min=0)
        return max(0, -(-span // self.step))

    def at(self, k: torch.Tensor) -> torch.Tensor:
        """The run's ``k``-th block (``k`` an int32 tensor of offsets)."""
        if self.step != 1:
            k = k * self.step
        return k if isinstance(self.lo, int) and self.lo == 0 else k + self.lo


class PowerRun(NamedTuple):
    """Key blocks ``anchor - 2^e`` (``e >= 0``) in ``[lo, hi)``, ascending (``e`` descending)."""

    anchor: int | torch.Tensor
    lo: int | torch.Tensor
    hi: int | torch.Tensor
    kind: str = "power"

    def members(self, j: torch.Tensor) -> torch.Tensor:
        distance = self.anchor - j
        return (j >= self.lo) & (j < self.hi) & (distance > 0) & ((distance & (distance - 1)) == 0)

    def _exponents(self):
        """(largest, smallest) e with ``lo <= anchor - 2^e < hi``: 2^e <= anchor - lo and 2^e > anchor - hi."""
        return _bit_length(self.anchor - self.lo) - 1, _bit_length(_maximum(self.anchor - self.hi, 0))

    def count(self):
        e_hi, e_lo = self._exponents()
        if isinstance(e_hi, int) and isinstance(e_lo, int):
            return 0 if self.hi <= self.lo else max(0, e_hi - e_lo + 1)
        return torch.where(torch.as_tensor(self.hi > self.lo), (e_hi - e_lo + 1).clamp(min=0), 0)

    def at(self, k: torch.Tensor) -> torch.Tensor:
        e_hi, _ = self._exponents()
        # Clamped where unused: no negative or overflowing shift.
        exponent = torch.minimum((e_hi - k).clamp(min=0), torch.as_tensor(_maximum(e_hi, 0)))
        return self.anchor - (torch.ones_like(exponent) << exponent)


def _bit_length(x):
    """``int.bit_length`` of host integers, and of int tensors element-wise (0 for x <= 0) with static shapes."""
    if isinstance(x, int):
        return x.bit_length()
    powers = torch.ones(31, dtype=x.dtype, device=x.device) << torch.arange(31, dtype=x.dtype, device=x.device)
    return (x[..., None] >= powers).sum(-1).to(x.dtype)


# ---- the patterns, once ------------------------------------------------------------------------------------------
def sink_and_window_runs(diagonal, first, block_k: int, sink_tokens: int, window: int) -> tuple[Run, Run]:
    """The blocks holding the first ``sink_tokens`` keys, and every block holding a key within ``window`` positions
    of some row of the query block (the earliest row, at position ``first``, sets the lower end)."""
    sinks = _minimum(math.ceil(sink_tokens / block_k), diagonal + 1)
    # Key k is in row p's window when p - k < window; the block holding the lowest such key starts the run.
    recent = _maximum(sinks, (first - window + 1) // block_k)
    return Run(0, sinks), Run(recent, diagonal + 1)


def power_of_two_runs(diagonal, sink_blocks: int, local_blocks: int) -> tuple[Run, PowerRun, Run]:
    """PowerAttention: sink blocks, the blocks at power-of-two distances from the diagonal block between them, and
    the ``local_blocks`` nearest blocks (runs that meet are one run)."""
    sinks = _minimum(sink_blocks, diagonal + 1)
    local = _maximum(sinks, diagonal + 1 - local_blocks)
    return Run(0, sinks), PowerRun(diagonal, sinks, local), Run(local, diagonal + 1)


def strided_shard_runs(diagonal, head, local_blocks: int, vert_stride: int) -> tuple[Run, Run]:
    """S2-Attention: head ``h`` reads the blocks ``j`` with ``(j + h) % vert_stride == 0`` before its
    ``local_blocks`` nearest blocks, then those (``head``: an int tensor broadcasting against ``diagonal``)."""
    local = _maximum(0, diagonal + 1 - local_blocks)
    return Run((-head) % vert_stride, local, vert_stride), Run(local, diagonal + 1)


# ---- prefill masks -----------------------------------------------------------------------------------------------
def runs_mask(runs, n_k: int, device=None) -> torch.Tensor:
    """The bool mask of rows given as runs (parameters ``[.., NQ, 1]``) over ``n_k`` key blocks."""
    j = torch.arange(n_k, device=device)
    mask = runs[0].members(j)
    for run in runs[1:]:
        mask = mask | run.members(j)
    return mask


def causal_allowed(g: BlockGeometry, device=None) -> torch.Tensor:
    """``[NQ, NK]``: key blocks holding at least one key some row of the query block may see."""
    return g.key_blocks(device) <= g.diagonal_block(device)[:, None]


def sink_and_window(g: BlockGeometry, sink_tokens: int, window: int, device=None) -> torch.Tensor:
    """``[NQ, NK]``: ``sink_and_window_runs`` of every query block.  A decode step reads what its whole query block
    would in a full forward (``prefill_aligned``), so cached and uncached generation agree."""
    g = g.prefill_aligned()
    runs = sink_and_window_runs(g.diagonal_block(device)[:, None], g.first_position(device)[:, None], g.block_k,
                                sink_tokens, window)
    return runs_mask(runs, g.n_k, device) & causal_allowed(g, device)


def power_of_two(g: BlockGeometry, sink_blocks: int, local_blocks: int, device=None) -> torch.Tensor:
    """``[NQ, NK]``: ``power_of_two_runs`` of every query block."""
    runs = power_of_two_runs(g.diagonal_block(device)[:, None], sink_blocks, local_blocks)
    return runs_mask(runs, g.n_k, device) & causal_allowed(g, device)


def strided_shards(g: BlockGeometry, heads: int, local_blocks: int, vert_stride: int, device=None) -> torch.Tensor:
    """``[heads, NQ, NK]``: ``strided_shard_runs`` of every head and query block; shifting the residue by the head
    index makes the heads' union cover every block once ``heads >= vert_stride``."""
    head = torch.arange(heads, device=device)[:, None, None]
    runs = strided_shard_runs(g.diagonal_block(device)[:, None], head, local_blocks, vert_stride)
    return runs_mask(runs, g.n_k, device) & causal_allowed(g, device)[None]


# ---- decode rows -------------------------------------------------------------------------------------------------
def sink_and_window_row(g: BlockGeometry, sink_tokens: int, window: int) -> tuple[Run, Run]:
    """One query block's ``sink_and_window`` runs in host integers (decoding: its diagonal is the last key block)."""
    g = g.prefill_aligned()
    return sink_and_window_runs(g.n_k - 1, g.offset, g.block_k, sink_tokens, window)


def sink_and_window_rows(g: BlockGeometry, sink_tokens: int, windows) -> tuple[tuple[Run, Run], ...]:
    """``sink_and_window_row`` of each window (one per head), each distinct window computed once."""
    g = g.prefill_aligned()
    rows = {w: sink_and_window_runs(g.n_k - 1, g.offset, g.block_k, sink_tokens, w) for w in set(windows)}
    return tuple(rows[w] for w in windows)


def power_of_two_row(g: BlockGeometry, sink_blocks: int, local_blocks: int) -> tuple[Run, PowerRun, Run]:
    """One query block's ``power_of_two`` runs in host integers."""
    return power_of_two_runs(g.n_k - 1, sink_blocks, local_blocks)


def strided_shard_rows(n_k: int, heads: int, local_blocks: int, vert_stride: int, device=None):
    """One query block's ``strided_shards`` runs for every head (the residues built on the device: no copy)."""
    head = torch.arange(heads, device=device, dtype=torch.int32)[:, None]
    return strided_shard_runs(n_k - 1, head, local_blocks, vert_stride)


def _runs_entries(runs, width: int, device=None):
    """(block ids ``[..., width]``, count) of ascending disjoint runs: entry ``i`` is the ``i``-th block of their
    union, 0 past the count; element-wise ops only."""
    i = torch.arange(width, device=device, dtype=torch.int32)
    idx = torch.zeros_like(i)
    start = 0
    for run in runs:
        n = run.count()
        if not torch.is_tensor(n) and n == 0:
            continue
        k = i if isinstance(start, int) and start == 0 else i - start
        inside = k < n if isinstance(start, int) and start == 0 else (k >= 0) & (k < n)
        idx = torch.where(inside, run.at(k), idx)
        start = start + n
    return idx, start


def rows_lists(runs, width: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists ``([B, H, 1, width], [B, H, 1])`` int32 of runs whose bounds are ``[B, H|1, 1]`` tensors (one decode
    row per batch row, lengths on the device: ``RowGeometry``); equal to ``runs_lists`` of each row's host runs."""
    idx, count = _runs_entries(runs, width, device)
    count = torch.as_tensor(count, device=device).to(torch.int32)
    shape = torch.broadcast_shapes(idx.shape[:-1], count.shape[:-1])
    idx = idx.to(torch.int32).expand(*shape, width)[:, :, None, :].contiguous()
    return idx, count.expand(*shape, 1).contiguous()


# ---- decode rows of different lengths (device) -------------------------------------------------------------------
def sink_and_window_device_rows(rows, sink_tokens: int, windows) -> tuple[Run, Run]:
    """``sink_and_window_row`` of every row of ``rows`` (a ``RowGeometry``); ``windows``: one int, or per-head
    windows as a ``[B|1, H, 1]`` tensor."""
    return sink_and_window_runs(rows.diagonal_block(), rows.first_position(), rows.block_k, sink_tokens, windows)


def power_of_two_device_rows(rows, sink_blocks: int, local_blocks: int) -> tuple[Run, PowerRun, Run]:
    """``power_of_two_row`` of every row of ``rows``."""
    return power_of_two_runs(rows.diagonal_block(), sink_blocks, local_blocks)


def strided_shard_device_rows(rows, heads: int, local_blocks: int, vert_stride: int):
    """``strided_shard_rows`` of every row of ``rows``: ``[B, heads, 1]`` bounds."""
    head = torch.arange(heads, device=rows.lengths.device, dtype=torch.int32)[None, :, None]
    return strided_shard_runs(rows.diagonal_block().to(torch.int32), head, local_blocks, vert_stride)


def runs_lists(runs, width: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One query block's lists ``([1, H, 1, width], [1, H, 1])`` int32 from its runs: ascending blocks, 0 past the
    count, equal to ``blocks_from_mask`` of ``runs_mask`` at that width; element-wise ops only (no host sync, no
    host-to-device copy: capturable in a CUDA graph)."""
    idx, start = _runs_entries(runs, width, device)
    heads = idx.shape[0] if idx.ndim == 2 else 1
    if torch.is_tensor(start):
        counts = start.to(torch.int32).reshape(1, heads, 1)
    else:
        counts = torch.full((1, heads, 1), start, device=device, dtype=torch.int32)
    return idx.reshape(1, heads, 1, width), counts
