"""``dense`` — the control method: exactly the model's own attention, through the patch machinery.

It is the oracle for every test: patching with ``dense`` must change no output (SDPA semantics; the explicit
softmax path where the model needs logit soft-capping, as Gemma-2 does).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MethodConfig
from ..kernels.dense import eager_attention, sdpa_attention
from ..registry import register_method


@dataclass(kw_only=True)
class DenseConfig(MethodConfig):
    """No knobs: dense attention over every allowed key."""


@register_method(
    "dense",
    config=DenseConfig,
    category="control",
    paper="Vaswani et al., Attention Is All You Need (NeurIPS 2017) - the unmodified model, as control",
    key_bounds=True,
)
def dense_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, key_bounds=None,
                    **kwargs):
    """Dense softmax attention, identical to the unpatched model."""
    # A decode step's mask already hides a static cache's empty slots and the padding: ``key_bounds`` adds nothing.
    if kwargs.get("softcap") is not None:
        return eager_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    return sdpa_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
