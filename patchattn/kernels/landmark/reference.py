"""Pure-torch reference of the landmark grouped-softmax kernel (the oracle of :mod:`.triton_fwd`, and the
``backend="torch"`` path of :func:`patchattn.kernels.landmark.landmark_block_attention`).

It does not walk the union lists as the kernel does: each row's picks are turned into block ids (``kv_indices`` of
the row's query block at the pick's entry), scattered into a per-row gate over every key block, and the grouped
softmax is computed on materialised scores, a chunk of rows at a time (at most ``chunk_scores`` scores a chunk).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Upper bound on the score elements (B * Hq * rows * keys) one chunk of rows materialises.
CHUNK_SCORES = 1 << 23


def landmark_block_attention_torch(q, k, v, kv_indices, kv_counts, pick_entry, pick_gate, *, block: int,
                                   local_blocks: int, scale: float, softcap: float | None = None,
                                   chunk_scores: int = CHUNK_SCORES) -> torch.Tensor:
    """``[B, Hq, Tq, D]`` in q's dtype; the arguments are those of
    :func:`patchattn.kernels.landmark.landmark_block_attention` (validated there).  Computed in float32 (float64
    for float64 inputs)."""
    batch, heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    pad = (kv_len - q_len) % block
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_block = (torch.arange(q_len, device=q.device) + pad) // block  # each row's query block
    lists = kv_indices.long().expand(batch, heads, -1, -1)[:, :, q_block]  # [B, Hq, Tq, W]
    counts = kv_counts.long().expand(batch, heads, -1)[:, :, q_block]  # [B, Hq, Tq]
    entry = pick_entry.long()
    chosen = (entry >= 0) & (entry < counts[..., None])
    picked = lists.gather(-1, entry.clamp(min=0, max=lists.shape[-1] - 1))  # [B, Hq, Tq, P]: block ids
    n_k = math.ceil(kv_len / block)
    step = max(1, chunk_scores // max(1, batch * heads * kv_len))
    outs = []
    for r0 in range(0, q_len, step):
        r1 = min(q_len, r0 + step)
        gates = torch.full((batch, heads, r1 - r0, n_k + 1), float("-inf"), dtype=compute, device=q.device)
        slot = torch.where(chosen[:, :, r0:r1], picked[:, :, r0:r1], n_k)  # not chosen: the dropped last column
        gates.scatter_(-1, slot, pick_gate[:, :, r0:r1].to(compute))
        first_pos = kv_len - q_len + r0
        outs.append(_rows(q[:, :, r0:r1], k, v, gates[..., :n_k], first_pos, block, local_blocks, scale, softcap,
                          compute))
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out.to(q.dtype)


def _rows(q, k, v, gates, first_pos: int, block: int, local: int, scale: float, softcap, compute) -> torch.Tensor:
    """Rows at key positions ``first_pos ..``: one softmax over the local keys (blocks ``c - local + 1 .. c``,
    causal) and the gates of the retrieved blocks; a retrieved block's weight is shared by a softmax over its own
    keys."""
    batch, heads, rows, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    n_k = math.ceil(kv_len / block)
    qf = q.to(compute).view(batch, kv_heads, group, rows, dim)
    scores = torch.einsum("bhgtd,bhsd->bhgts", qf, k.to(compute)).reshape(batch, heads, rows, kv_len) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    row_pos = first_pos + torch.arange(rows, device=q.device)
    key_pos = torch.arange(kv_len, device=q.device)
    local_keys = (key_pos[None] <= row_pos[:, None]) & (key_pos[None] // block > (row_pos // block - local)[:, None])
    local_scores = scores.masked_fill(~local_keys, float("-inf"))
    scores = F.pad(scores, (0, n_k * block - kv_len), value=float("-inf")).view(batch, heads, rows, n_k, block)
    block_lse = torch.logsumexp(scores, dim=-1)  # [B, Hq, rows, NK]
    total = torch.logsumexp(torch.cat([local_scores, gates], dim=-1), dim=-1, keepdim=True)  # finite: own key
    weight_local = torch.exp(local_scores - total)  # [B, Hq, rows, Tk]
    gate_share = torch.exp(gates - total)  # [B, Hq, rows, NK]: the block's mass
    in_block = torch.exp(scores - block_lse[..., None]).nan_to_num(0.0)  # within-block softmax (empty block: 0)
    weight_blocks = (gate_share[..., None] * in_block).view(batch, heads, rows, n_k * block)[..., :kv_len]
    weights = (weight_local + weight_blocks).view(batch, kv_heads, group, rows, kv_len)
    out = weights @ v.to(compute)[:, :, None]
    return out.reshape(batch, heads, rows, v.shape[-1])
