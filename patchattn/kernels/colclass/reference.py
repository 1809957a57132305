"""Pure-torch class-mass attention: the CPU path (``backend="torch"``) and the oracle of the Triton kernel.

Chunked over query rows so no ``Tq x Tk`` score matrix is ever whole: each chunk holds at most
``CHUNK_SCORE_ELEMENTS`` scores.  Computes in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import torch

# Upper bound on score elements materialised per chunk: ~32 MB per live fp32 score-sized tensor.
CHUNK_SCORE_ELEMENTS = 1 << 23
CLASS_BITS = 3


def class_attention_torch(q, k, v, classes, *, scale: float, kv_start=None):
    """Same contract as :func:`patchattn.kernels.colclass.class_attention` (inputs validated):
    ``(mass [B, Hq, Tq, 3], normalised [B, Hq, Tq, D], weighted [B, Hq, Tq, D])`` in the compute dtype."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    keys = k.to(compute)[:, :, None]  # [B, Hkv, 1, Tk, D]: the group folds into a broadcast dim
    values = v.to(compute)[:, :, None]
    codes = classes.to(torch.int32)
    bits = torch.stack([(codes >> i) & 1 for i in range(CLASS_BITS)], -1).to(compute)  # [B, Tk, 3]
    member = bits[:, None, None]  # [B, 1, 1, Tk, 3]: right operand of the per-class sums
    first_class, second_class = bits[:, None, None, None, :, 0], bits[:, None, None, None, :, 1]  # [B,1,1,1,Tk]
    positions = torch.arange(Tk, device=q.device)
    first = kv_start.to(q.device).long()[:, None, None] if kv_start is not None else None
    rows = max(1, CHUNK_SCORE_ELEMENTS // max(1, B * Hq * Tk))
    masses, normalised, weighted = [], [], []
    for lo in range(0, Tq, rows):
        hi = min(Tq, lo + rows)
        chunk = q[:, :, lo:hi].to(compute).reshape(B, Hkv, group, hi - lo, D)
        scores = chunk @ keys.transpose(-1, -2) * scale  # [B, Hkv, G, c, Tk]
        seen = positions[None, :] <= (torch.arange(lo, hi, device=q.device) + Tk - Tq)[:, None]  # [c, Tk]
        seen = seen[None] if first is None else seen[None] & (positions >= first)  # [B', c, Tk]
        scores = scores.masked_fill(~seen[:, None, None], float("-inf"))
        top = scores.amax(-1, keepdim=True)
        probs = torch.exp(scores - torch.where(torch.isinf(top), 0.0, top))  # unnormalised; 0 where unseen
        total = probs.sum(-1)  # l_all
        sums = probs @ member  # [B, Hkv, G, c, 3]: l of each class
        acc_first = (probs * first_class) @ values
        acc_second = (probs * second_class) @ values
        masses.append(sums / torch.where(total > 0, total, 1.0)[..., None])
        normalised.append(acc_first / torch.where(sums[..., 0] > 0, sums[..., 0], 1.0)[..., None])
        weighted.append(acc_second / torch.where(total > 0, total, 1.0)[..., None])
    shape = lambda parts, last: torch.cat(parts, dim=3).reshape(B, Hq, Tq, last)
    return shape(masses, CLASS_BITS), shape(normalised, D), shape(weighted, D)
