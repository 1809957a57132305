"""Static block patterns (they depend only on positions, so they are built once per shape and cached)."""

from __future__ import annotations

import math

import torch

from .geometry import BlockGeometry


def causal_allowed(g: BlockGeometry, device=None) -> torch.Tensor:
    """``[NQ, NK]``: key blocks holding at least one key some row of the query block may see."""
    return g.key_blocks(device) <= g.diagonal_block(device)[:, None]


def sink_and_window(g: BlockGeometry, sink_tokens: int, window: int, device=None) -> torch.Tensor:
    """``[NQ, NK]``: blocks holding the first ``sink_tokens`` keys, and every block holding a key within ``window``
    positions of some row of the query block (so each row's token window is fully covered).  A decode step reads
    what its whole query block would in a full forward, so cached and uncached generation agree."""
    g = g.prefill_aligned()
    j = g.key_blocks(device)
    sinks = j < math.ceil(sink_tokens / g.block_k)
    # Key k is in row p's window when p - k < window; the earliest row (first position) sets the lower bound.
    lowest_key = g.first_position(device)[:, None] - window + 1
    recent = (j + 1) * g.block_k - 1 >= lowest_key
    return (sinks | recent) & causal_allowed(g, device)


def power_of_two(g: BlockGeometry, sink_blocks: int, local_blocks: int, device=None) -> torch.Tensor:
    """``[NQ, NK]``: PowerAttention's pattern: sink blocks, ``local_blocks`` nearest blocks, and blocks at
    power-of-two distances from the diagonal block."""
    distance = g.diagonal_block(device)[:, None] - g.key_blocks(device)
    is_power = (distance > 0) & ((distance & (distance - 1)) == 0)
    keep = (g.key_blocks(device) < sink_blocks) | ((distance >= 0) & (distance < local_blocks)) | is_power
    return keep & causal_allowed(g, device)


def strided_shards(g: BlockGeometry, heads: int, local_blocks: int, vert_stride: int, device=None) -> torch.Tensor:
    """``[heads, NQ, NK]``: S2-Attention's heterogeneous sharding: every head reads its ``local_blocks`` nearest
    blocks plus the blocks ``j`` with ``(j + h) % vert_stride == 0``; shifting the residue by the head index
    makes the heads' union cover every block once ``heads >= vert_stride``."""
    distance = g.diagonal_block(device)[:, None] - g.key_blocks(device)
    local = (distance >= 0) & (distance < local_blocks)
    head = torch.arange(heads, device=device)[:, None, None]
    shard = (g.key_blocks(device)[None] + head) % vert_stride == 0
    return (local[None] | shard) & causal_allowed(g, device)[None]
