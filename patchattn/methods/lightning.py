"""``lightning`` — Lightning Attention-2 (decayed causal linear attention) in place of every softmax layer.

Qin et al., "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large Language Models",
arXiv 2401.04658; the model-side pieces (decay schedule, SiLU features, norm, output gate) from TransNormerLLM
(arXiv 2307.14995).  Those models are trained from scratch; converting a pretrained softmax model needs training
(spec section 12.3), so the defaults are a LoLCATs-style conversion (arXiv 2410.10254): a learnable "hedgehog" feature
map initialised to the identity, the linear-attention denominator, and TransNormerLLM's output gate starting at 1.
The maths, the options and the decoding state: ``methods/_lightning.py``; the kernel: ``kernels/lightning``.

Without fine-tuning (``recipes/lightning``) the patched model is a different model: ``needs_finetune=True``.  The
layer's new parameters are ``nn.Parameter`` s on its ``PatchState`` (``...self_attn.patchattn.feature_q``,
``feature_k``, ``norm_weight``, ``gate_down``, ``gate_up``), trained beside LoRA and reloaded by
``patchattn.load(..., adapter=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import register_method
from ._lightning import (
    LIGHTNING_PAPER,
    LightningConfig,
    LightningState,
    conversion_parameters,
    end_transfer,
    linear_layer,
    make_lightning_state,
    transfer_loss,
)

__all__ = ["LightningAttentionConfig", "conversion_parameters", "end_transfer", "transfer_loss"]


@dataclass(kw_only=True)
class LightningAttentionConfig(LightningConfig):
    """Every option is shared with ``hybrid`` (``_lightning.LightningConfig``)."""


@register_method(
    "lightning",
    config=LightningAttentionConfig,
    category="linear",
    families=("llm", "lvlm"),
    patterns=("causal-self",),
    needs_finetune=True,
    make_state=make_lightning_state,
    state_cls=LightningState,
    paper=LIGHTNING_PAPER,
)
def lightning_attention_fn(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, **kwargs):
    """Lightning Attention-2: causal linear attention with per-head decay, tiled, O(1) per decoded token."""
    return linear_layer(module, query, key, value, attention_mask, scaling=scaling, **kwargs), None
