"""What the DiT methods on frame-aligned plans (``radial``, ``clear``) share: the dense path and one engine call of a
``masks.frames.FramePlan`` (permute, block-sparse attention with partial tiles, unpermute), with a key-padding mask
(HunyuanVideo's padded text) as the engine's per-key bias."""

from __future__ import annotations

import warnings

import torch

from ..kernels.blocksparse import block_sparse_attention
from ..masks.frames import FramePlan
from ._dit import dense_sdpa, key_bias_in_order


def run_dense(state, query, key, value, attention_mask, scaling, dropout, is_causal, enable_gqa):
    """The model's own SDPA, exactly (density 1 recorded)."""
    state.record(density=1.0)
    return dense_sdpa(query, key, value, attention_mask, scaling=scaling, dropout=dropout, is_causal=is_causal,
                      enable_gqa=enable_gqa), None


def run_plan(name: str, plan: FramePlan, query, key, value, attention_mask, scaling, backend: str, enable_gqa: bool):
    """One engine call over ``plan`` (``query [B, H, T, D]``), returned ``[B, T, H, D]``."""
    bias = None
    if attention_mask is not None:
        bias = key_bias_in_order(attention_mask, query.shape[1], plan.length, plan.position)
        if bias is None:
            return _masked_dense(name, plan, query, key, value, attention_mask, scaling, enable_gqa)
    tiled = plan.tiled
    if tiled.kv_indices.device != query.device:
        tiled = tiled.to(query.device)
    q, k, v = plan.permute(query), plan.permute(key), plan.permute(value)
    out = block_sparse_attention(q, k, v, tiled.kv_indices, tiled.kv_counts, block_q=tiled.block_q,
                                 block_k=tiled.block_k, causal=False, scale=scaling, col_bias=bias,
                                 tile_masks=tiled.tile_masks, tile_mask_ids=tiled.tile_mask_ids, backend=backend)
    return plan.unpermute(out).transpose(1, 2)


def _masked_dense(name, plan: FramePlan, query, key, value, attention_mask, scaling, enable_gqa):
    """A mask over queries and keys (no tiny family passes one): dense SDPA over it and the plan's mask (T x T)."""
    warnings.warn(f"patchattn {name}: this self/joint attention call has an attn_mask that depends on the query; it "
                  "runs as dense SDPA with the method's mask (T x T) added, not through the block-sparse engine",
                  stacklevel=3)
    allowed = plan.token_mask().to(query.device)
    if attention_mask.dtype == torch.bool:
        mask = attention_mask & allowed
    else:
        mask = attention_mask.masked_fill(~allowed, float("-inf"))
    return dense_sdpa(query, key, value, mask, scaling=scaling, enable_gqa=enable_gqa)
