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


def causal_positions(q_len: int, kv_len: int, ends, device) -> torch.Tensor:
    """long ``[B|1, Tq]``: each query row's key position, the last ``q_len`` keys (of each row's real keys when
    ``ends`` [B] is given; positions may be negative: such rows see nothing)."""
    rows = torch.arange(q_len, device=device)[None]
    if ends is None:
        return rows + (kv_len - q_len)
    return rows + ends.to(device).long()[:, None] - q_len


def causal_seen_by(q_len: int, kv_len: int, device, dtype) -> torch.Tensor:
    """``[Tk]``: the number of query positions at or after each key, ``min(Tq, Tk - j)`` (``N - j`` when
    ``Tq == Tk``)."""
    return (kv_len - torch.arange(kv_len, device=device)).clamp(max=q_len).to(dtype)


def received_causal_torch(q, k, lse, *, scale: float, starts=None, ends=None, columns: bool = True,
                          chunk_rows: int = DEFAULT_CHUNK_ROWS):
    """Same contract as :func:`patchattn.kernels.received.received_causal` (inputs validated), chunked over query
    rows: ``(refined lse [B, Hq, Tq], column scores [B, Hq, Tk] or None)`` in the compute dtype."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    keys = k.to(compute)[:, :, None].transpose(-1, -2)  # [B, Hkv, 1, D, Tk]
    lse = lse.to(compute)
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    positions = causal_positions(Tq, Tk, ends, q.device)  # [B|1, Tq]
    key_pos = torch.arange(Tk, device=q.device)
    start = None if starts is None else starts.to(q.device).long().view(-1, 1, 1)
    total = torch.zeros(B, Hq, Tk, dtype=compute, device=q.device) if columns else None
    refined = []
    for lo in range(0, Tq, chunk_rows):
        hi = min(Tq, lo + chunk_rows)
        rows = q[:, :, lo:hi].to(compute).reshape(B, Hkv, Hq // Hkv, hi - lo, D) * scale
        scores = (rows @ keys).reshape(B, Hq, hi - lo, Tk)
        pos = positions[:, lo:hi, None]  # [B|1, c, 1]
        ok = key_pos <= pos
        if start is not None:
            ok = ok & (key_pos >= start) & (pos >= start)
        ok = ok[:, None] & finite[:, :, lo:hi, None]
        probs = scores.sub_(safe[:, :, lo:hi, None]).exp_().masked_fill_(~ok, 0.0)
        row = probs.sum(-1)
        refined.append(lse[:, :, lo:hi] + torch.log(row))
        if columns:
            weights = torch.where(row > 0, 1.0 / row, torch.zeros_like(row))
            total += (weights[:, :, None] @ probs)[:, :, 0]
    refined = torch.cat(refined, dim=2) if refined else lse.clone()
    if not columns:
        return refined, None
    return refined, total / causal_seen_by(Tq, Tk, q.device, compute)
