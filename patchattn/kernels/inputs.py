"""Input checks the attention kernels share: one message per mistake, naming the kernel."""
from __future__ import annotations

import torch


def check_qkv(where: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q ``[B, Hq, Tq, D]``, k and v ``[B, Hkv, Tk, D]`` alike with ``Hkv`` dividing ``Hq`` (GQA) and the queries the
    last ``Tq <= Tk`` keys, one floating dtype; raises ``ValueError`` naming ``where`` otherwise."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{where}: q, k, v must be 4-D [B, H, T, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    batch, heads, q_len, dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != dim:
        raise ValueError(f"{where}: k and v must be [B={batch}, Hkv, Tk, D={dim}] alike; got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"{where}: query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
    if q_len > kv_len:
        raise ValueError(f"{where}: the queries are the last Tq keys, so Tq ({q_len}) must be <= Tk ({kv_len})")
    if not (q.is_floating_point() and q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{where}: q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
