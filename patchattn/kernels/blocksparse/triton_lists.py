"""Block mask -> ascending block lists on the GPU: one program per row writes the indices of its set columns at
their exclusive prefix-sum positions (no sort).  The torch path (``blocks_from_mask`` in ``__init__``) sorts every
row, which at 128k x 32 heads (2048 x 2048 blocks per head) costs more than the sparse attention it feeds."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_fwd import _add, reduce_sum

CHUNK = 1024


@triton.jit
def zero_tail(row_ptr, count, width, CHUNK: tl.constexpr):
    """Zero a list row's entries from ``count`` to ``width`` (as the torch path leaves them)."""
    for c in range(0, width, CHUNK):
        w = c + tl.arange(0, CHUNK)
        tl.store(row_ptr + w, w * 0, mask=(w >= count) & (w < width))


@triton.jit
def _compact_kernel(Mask, Idx, n_k, width, CHUNK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    mask_row = Mask + row * n_k
    idx_row = Idx + row * width
    written = tl.full([], 0, tl.int32)
    for c in range(0, n_k, CHUNK):
        cols = c + tl.arange(0, CHUNK)
        hit = tl.load(mask_row + cols, mask=cols < n_k, other=0).to(tl.int32)
        slot = written + tl.associative_scan(hit, 0, _add) - 1
        tl.store(idx_row + slot, cols, mask=(hit > 0) & (slot < width))
        written += reduce_sum(hit, 0)
    zero_tail(idx_row, written, width, CHUNK)


def compact(block_mask: torch.Tensor, width: int) -> torch.Tensor:
    """int32 ``[..., width]``: each row's set columns, ascending, then zeros."""
    n_k = block_mask.shape[-1]
    rows = block_mask.numel() // max(1, n_k)
    flat = block_mask.contiguous().view(torch.uint8)
    idx = torch.empty((*block_mask.shape[:-1], width), dtype=torch.int32, device=block_mask.device)
    if rows:
        _compact_kernel[(rows,)](flat, idx, n_k, width, CHUNK=CHUNK, num_warps=4)
    return idx
