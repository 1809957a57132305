"""``hybrid`` — MiniMax-01's layer mix: Lightning Attention-2 in most layers, softmax attention in 1 of every k.

MiniMax-01 (arXiv 2501.08313) stacks 7 lightning layers then 1 softmax layer (``softmax_every=8``: layers
7, 15, 23, ... keep softmax attention); ``softmax_layers`` lists them explicitly instead.  The softmax layers run the
model's own attention, or with ``softmax_window=W`` causal sliding-window attention over W keys.  The lightning
layers are ``lightning``'s (shared code: ``methods/_lightning.py``), with the same options and conversion
parameters; softmax layers get none.  ``needs_finetune=True`` (``recipes/hybrid``: attention transfer + LoRA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import option
from ..registry import register_method
from ._lightning import (
    LIGHTNING_PAPER,
    LightningConfig,
    LightningState,
    conversion_parameters,
    end_transfer,
    linear_layer,
    make_lightning_state,
    softmax_layer,
    transfer_loss,
)

__all__ = ["HybridConfig", "conversion_parameters", "end_transfer", "softmax_layer_indices", "transfer_loss"]


@dataclass(kw_only=True)
class HybridConfig(LightningConfig):
    softmax_every: int = option(8, "one softmax layer in every k: layers k-1, 2k-1, ... (MiniMax-01: 8, i.e. 7 "
                                "lightning : 1 softmax)", min=1)
    softmax_layers: list | None = option(None, "explicit softmax layer indices (overrides softmax_every)",  # noqa: RUF009
                                         index="layer")
    softmax_window: int | None = option(None, "softmax layers: causal sliding window of this many keys (None: "
                                        "the model's full attention)", min=1)

    DENSE_EQUIVALENT: ClassVar[dict] = {"softmax_every": 1}  # every layer keeps the model's softmax attention


def keeps_softmax(config: HybridConfig, layer: int) -> bool:
    """Whether ``layer`` keeps softmax attention (an explicit list, else 1 of every ``softmax_every``)."""
    if config.softmax_layers is not None:
        return layer in config.softmax_layers
    return layer % config.softmax_every == config.softmax_every - 1


def softmax_layer_indices(config: HybridConfig, num_layers: int) -> list[int]:
    """The layers that keep softmax attention."""
    if config.softmax_layers is not None:
        return sorted(set(config.softmax_layers))
    return [layer for layer in range(num_layers) if keeps_softmax(config, layer)]


def make_hybrid_state(module, config: HybridConfig, layer_index, role, context):
    return make_lightning_state(module, config, layer_index, role, context,
                                softmax=keeps_softmax(config, layer_index))


@register_method(
    "hybrid",
    config=HybridConfig,
    category="linear",
    families=("llm", "lvlm"),
    patterns=("causal-self",),
    needs_finetune=True,
    make_state=make_hybrid_state,
    state_cls=LightningState,
    paper="MiniMax-01: Scaling Foundation Models with Lightning Attention, arXiv 2501.08313; " + LIGHTNING_PAPER,
)
def hybrid_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, **kwargs):
    """MiniMax-01 hybrid: lightning attention in most layers, softmax (full or windowed) in 1 of every k."""
    state = module.patchattn
    if state.method_state.softmax:
        return softmax_layer(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                             window=state.config.softmax_window, **kwargs)
    return linear_layer(module, query, key, value, attention_mask, scaling=scaling, **kwargs), None
