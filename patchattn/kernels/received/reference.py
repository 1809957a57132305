"""Pure-torch received attention: the CPU path (``backend="torch"``), for masks, and float64.

Chunked over query rows (``chunk_rows`` at a time), so no ``Tq x Tk`` score matrix is ever whole.  Per chunk:
scores ``(q * scale) k^T``, each row's max subtracted and ``exp`` taken in place, then the column sums weighted by
each row's ``1 / l`` as one ``[1, c] @ [c, Tk]`` product: the softmax is never normalised element by element.
Computes in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import torch

DEFAULT_CHUNK_ROWS = 256


def received_attention_torch(q, k, *, scale: float, mask=None, chunk_rows: int = DEFAULT_CHUNK_ROWS):
    """Same contract as :func:`patchattn.kernels.received.received_attention` (inputs validated): ``[B, Hq, Tk]``
    in the compute dtype."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    keys = k.to(compute)[:, :, None].transpose(-1, -2)  # [B, Hkv, 1, D, Tk]: the group folds into a broadcast dim
    total = torch.zeros(B, Hkv, Hq // Hkv, 1, Tk, dtype=compute, device=q.device)
    for lo in range(0, Tq, chunk_rows):
        hi = min(Tq, lo + chunk_rows)
        rows = (q[:, :, lo:hi].to(compute) * scale).reshape(B, Hkv, Hq // Hkv, hi - lo, D)
        scores = rows @ keys  # [B, Hkv, G, c, Tk]
        if mask is not None:
            scores = _masked(scores, mask[..., lo:hi, :], B, Hkv, Hq)
        top = scores.amax(-1, keepdim=True)
        if mask is not None:  # a row that sees no key: exp(-inf) = 0 everywhere, no NaN
            top = torch.where(torch.isinf(top), 0.0, top)
        probs = scores.sub_(top).exp_()  # unnormalised
        sums = probs.sum(-1, keepdim=True)
        weights = torch.where(sums > 0, 1.0 / sums, 0.0) if mask is not None else 1.0 / sums
        total += weights.transpose(-1, -2) @ probs  # [B, Hkv, G, 1, Tk]: sum_i p_ij / l_i
    return (total / max(Tq, 1)).reshape(B, Hq, Tk)


def _masked(scores, mask, B, Hkv, Hq):
    """``scores [B, Hkv, G, c, Tk]`` with a bool (False: hidden) or additive mask broadcastable to
    ``[B, Hq, c, Tk]``."""
    mask = mask.expand(B, Hq, *mask.shape[-2:]).reshape(B, Hkv, Hq // Hkv, *mask.shape[-2:])
    if mask.dtype == torch.bool:
        return scores.masked_fill_(~mask, float("-inf"))
    return scores.add_(mask.to(scores.dtype))
