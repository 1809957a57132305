"""Pure-torch dense attention in transformers' calling convention.

``sdpa_attention`` is exactly what a transformers model computes with ``attn_implementation="sdpa"`` (it is
transformers' own function, so the control method cannot drift from it).  ``eager_attention`` is the explicit
softmax formulation transformers' eager path uses; it is needed where SDPA cannot express the model's maths
(Gemma-2's logit soft-capping).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

# transformers' SDPA attention itself; query ``[B, Hq, Tq, D]`` -> output ``[B, Tq, Hq, D]``, called as
# ``sdpa_attention(module, query, key, value, attention_mask, scaling=..., dropout=..., **kwargs)``.  The function
# itself, not a wrapper: the dense control method calls it in every layer of every forward, and a wrapper would be
# one more Python call there each time (design note 57).
sdpa_attention = sdpa_attention_forward


def eager_attention(
    module: nn.Module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, softcap=None, **kwargs
):
    """Explicit softmax attention (optionally soft-capped); query ``[B, Hq, Tq, D]`` -> ``[B, Tq, Hq, D]``."""
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = _apply_mask(scores, attention_mask, query, key, module)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value)
    return out.transpose(1, 2).contiguous(), weights


def _apply_mask(scores, attention_mask, query, key, module):
    if attention_mask is None:
        if getattr(module, "is_causal", False) and query.shape[2] > 1:
            q_len, k_len = query.shape[2], key.shape[2]
            allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril(k_len - q_len)
            return scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        return scores
    mask = attention_mask[:, :, :, : key.shape[-2]]
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return scores + mask
