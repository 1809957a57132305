"""Helpers shared by the head-level methods (``act``, ``headscale``, ``moh``): model dimensions, head lists,
valid query rows under left padding, each row's newest token in a decode step given ``KeyBounds``, and the choice
between the fused kernel and the pure-torch path."""

from __future__ import annotations

import os

import torch

from ..kernels.blocksparse import block_sparse_attention, causal_blocks
from ._rows import real_blocks
from ._sparse import dense_call, padding_start


def head_counts(module) -> tuple[int, int, int]:
    """(query heads, kv heads, head_dim) of an attention module: from its transformers model config, or from a
    diffusers attention module's own ``heads`` / ``inner_dim`` / ``inner_kv_dim``."""
    config = getattr(module, "config", None)
    if config is None and isinstance(getattr(module, "heads", None), int):
        heads = module.heads
        head_dim = getattr(module, "head_dim", None) or module.inner_dim // heads
        kv_dim = getattr(module, "inner_kv_dim", None) or heads * head_dim
        return heads, kv_dim // head_dim, head_dim
    if config is None:
        raise ValueError(f"{type(module).__name__} has no model config; the head-level methods need one")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(module, "head_dim", None) or getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim


def check_heads(where: str, heads, num_heads: int) -> list[int]:
    """Sorted unique head indices, or ValueError saying which index is out of range and what is allowed."""
    out = set()
    for h in heads:
        if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < num_heads:
            raise ValueError(f"{where}: head index {h!r} is not allowed; heads are ints in [0, {num_heads - 1}]")
        out.add(h)
    return sorted(out)


def layer_key(where: str, key, num_layers: int | None = None) -> int:
    """A layer index from a dict key (``3`` or ``"3"``, as JSON writes it)."""
    try:
        layer = int(key)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: layer key {key!r} is not an integer") from None
    if layer < 0 or (num_layers is not None and layer >= num_layers):
        bound = f"[0, {num_layers - 1}]" if num_layers is not None else ">= 0"
        raise ValueError(f"{where}: layer {layer} is out of range; layers are {bound}")
    return layer


def valid_rows(attention_mask, batch: int, q_len: int, kv_len: int, device) -> torch.Tensor | None:
    """bool ``[B, Tq]``: query rows that are real tokens (not left padding); None when nothing is padded.

    Raises ValueError (from ``padding_start``) when the mask is not causal + left padding.
    """
    start = padding_start(attention_mask, batch, kv_len)
    if start is None:
        return None
    positions = torch.arange(q_len, device=device) + (kv_len - q_len)
    return positions[None, :] >= start.to(device).long()[:, None]


def newest_positions(ends: torch.Tensor, q_len: int) -> torch.Tensor:
    """long ``[B, Tq]``: where the queries of a call given ``KeyBounds`` sit, the last ``q_len`` of each row's real keys
    (``ends``: one past each row's last; a static cache's empty slots follow them; a row with no real key gets
    negative positions, which see nothing)."""
    ends = ends.long()[:, None]
    return ends - q_len + torch.arange(q_len, device=ends.device)[None]


def newest_values(value: torch.Tensor, ends: torch.Tensor, q_len: int) -> torch.Tensor:
    """``[B, H, Tq, D]``: the values of each row's newest ``q_len`` real keys (``value[:, :, -q_len:]`` of a cache
    that ends with them)."""
    positions = newest_positions(ends, q_len).clamp(min=0)
    index = positions[:, None, :, None].expand(-1, value.shape[1], -1, value.shape[-1])
    return value.gather(2, index)


def kv_start_of(attention_mask, batch: int, kv_len: int):
    """``[B]`` first valid key (int32) under left padding, or None."""
    return padding_start(attention_mask, batch, kv_len)


def use_fused_kernel(backend: str, query: torch.Tensor) -> bool:
    """Whether the Triton kernel runs here (``auto`` on CUDA or under ``TRITON_INTERPRET=1``, or ``triton``)."""
    if backend == "torch":
        return False
    if backend == "triton":
        return True
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return (query.is_cuda or interpreting) and query.dtype in (torch.float16, torch.bfloat16, torch.float32)


def full_causal_attention(query, key, value, *, scaling, kv_start, backend, head_gain=None, active=None,
                          return_lse=False, block: int = 64, kv_end=None):
    """Causal attention over every key through the block-sparse kernel (hooks: gains, active, lse).

    ``kv_end`` (a decode step given ``KeyBounds``: ``kv_start`` and ``kv_end`` are each row's real keys, the query its
    newest): every real block of each row, counted from its first real key, with static shapes and no host read.
    Returns ``[B, Hq, Tq, D]`` (and lse ``[B, Hq, Tq]``) like ``block_sparse_attention``.
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    if kv_end is not None:
        idx, counts = real_blocks(kv_end - kv_start, kv_len, block)
        return block_sparse_attention(query, key, value, idx, counts, block_q=block, block_k=block, causal=True,
                                      scale=scaling, kv_start=kv_start, kv_end=kv_end, lists_from_start=True,
                                      head_gain=head_gain, active=active, return_lse=return_lse, backend=backend)
    idx, counts = causal_blocks(q_len, kv_len, block, block, device=query.device)
    return block_sparse_attention(query, key, value, idx, counts, block_q=block, block_k=block, causal=True,
                                  scale=scaling, kv_start=kv_start, head_gain=head_gain, active=active,
                                  return_lse=return_lse, backend=backend)


def full_noncausal_attention(query, key, value, *, scaling, backend, head_gain=None, active=None, block: int = 64):
    """Bidirectional attention over every key through the block-sparse kernel (DiTs; hooks: gains, active)."""
    n_q, n_k = -(-query.shape[2] // block), -(-key.shape[2] // block)
    idx = torch.arange(n_k, dtype=torch.int32, device=query.device).expand(1, 1, n_q, n_k)
    counts = torch.full((1, 1, n_q), n_k, dtype=torch.int32, device=query.device)
    return block_sparse_attention(query, key, value, idx, counts, block_q=block, block_k=block, causal=False,
                                  scale=scaling, head_gain=head_gain, active=active, backend=backend)


__all__ = ["check_heads", "dense_call", "full_causal_attention", "full_noncausal_attention", "head_counts",
           "kv_start_of", "layer_key", "newest_positions", "newest_values", "use_fused_kernel", "valid_rows"]
