"""Sliding-window layers (Gemma 2/3, Mistral, Qwen2 with ``layer_types``) in a context-parallel chunk.

transformers calls such a layer's attention with ``sliding_window=W``: query ``q`` reads keys ``k`` with
``q - W < k <= q``.  A patched model keeps these layers dense in one process (``_sparse.layer_dense_reason``),
through the model's mask; a chunk has no mask (the ranks build none), so it runs the same band here: queries are
the last positions of the keys given, and only the keys the band reaches are read, query tile by query tile (a
tile's mask is ``tile x (tile + W)``, never the chunk's whole square).  Soft-capped models (Gemma 2) take the
explicit softmax, the others SDPA, as the one-process dense call does.
"""

from __future__ import annotations

import torch

from ..kernels.dense.reference import eager_attention

TILE = 1024  # queries per band call
_INFERENCE = torch.nn.Module().eval()  # the module eager_attention asks for: inference, no dropout


def window_attention(q, k, v, *, window: int, scaling=None, softcap=None, tile: int = TILE) -> torch.Tensor:
    """``[B, Tq, Hq, Dv]``: queries ``[B, Hq, Tq, D]`` at the last ``Tq`` positions of keys ``[B, Hkv, Tk, D]``, each
    reading the keys of its window of ``window`` positions (itself included)."""
    scaling = q.shape[-1] ** -0.5 if scaling is None else scaling
    q_len, k_len = q.shape[2], k.shape[2]
    offset = k_len - q_len  # key index of the first query
    outs = []
    for a in range(0, q_len, tile):
        b = min(a + tile, q_len)
        lo = max(0, offset + a - window + 1)  # the first key the tile's first query reads
        keys = torch.arange(lo, offset + b, device=q.device)
        queries = torch.arange(offset + a, offset + b, device=q.device)[:, None]
        allowed = (keys[None] <= queries) & (keys[None] > queries - window)
        outs.append(_masked(q[:, :, a:b], k[:, :, lo:offset + b], v[:, :, lo:offset + b], allowed, scaling, softcap))
    return torch.cat(outs, dim=2).transpose(1, 2)


def _masked(q, k, v, allowed, scaling, softcap) -> torch.Tensor:
    """``[B, Hq, Tq, Dv]`` attention under a boolean ``[Tq, Tk]`` mask (every query sees at least itself)."""
    groups = q.shape[1] // k.shape[1]
    if softcap is None:
        if q.is_cuda and groups > 1:  # the fused masked kernels take equal head counts
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling,
                                                                enable_gqa=q.shape[1] != k.shape[1])
    # The one-process dense call's soft-capped softmax (it reads only ``training`` of the module: dropout is 0).
    out, _ = eager_attention(_INFERENCE, q, k, v, allowed[None, None], scaling=scaling, softcap=softcap)
    return out.transpose(1, 2)
