"""``softpag`` — HeadHunter's fine-grained perturbed-attention guidance: chosen heads' attention blended toward the
identity map (each token attends only to itself) to make the "weak model" that guidance pushes away from.

Paper: Ahn et al., Fine-Grained Perturbation Guidance via Attention Head Selection (HeadHunter / SoftPAG, arXiv
2506.10978).  No official code was available; this follows the paper's definition.

For a selected head (``layer``, ``head``) of a self or joint call, SoftPAG's map is ``A' = (1 - s)·softmax(QKᵀ/√d) +
s·I``, so its output is ``(1 - s)·Attn(Q, K, V) + s·V``: the normal output blended with the head's own values, no
attention matrix needed.  ``s = 1`` is PAG's identity map on that head (HeadHunter's hard perturbation), ``s = 0``
leaves it untouched.  The identity covers every query row of the head, text rows of a joint call too (the paper
perturbs the head's whole map).  Cross attention (text keys only) has no identity map: it stays dense.

Perturbation is off by default: the patched model is the dense model, exactly, until the guidance helper
(``patchattn.dit.guidance``) runs its perturbed pass (or ``perturb=True``, the weak model itself).  Heads come from
``heads`` (``[[layer, head], ...]``, layers counted as the adapter counts attention modules) and/or ``head_file``
(a JSON head list written by ``patchattn calibrate headhunter``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import torch

from ..artifacts import load_artifact
from ..config import check_indices, option
from ..registry import register_method
from ..state import MethodState
from ._dit import DiTScheduleConfig, dense_sdpa, dit_call, scheduled_dense

PAYLOAD = "softpag_heads"
WHAT = "HeadHunter head list"


@dataclass(kw_only=True)
class SoftPAGConfig(DiTScheduleConfig):
    """Which heads the perturbed pass blends toward identity, and how far."""

    heads: list = option([], "perturbed heads as [layer, head] pairs (layer: attention module, adapter order)")
    head_file: str = option("", "JSON head list from `patchattn calibrate headhunter` (added to heads)")
    scale: float = option(1.0, "SoftPAG strength s: out = (1 - s) * attention + s * V on the chosen heads (1: PAG's "
                          "identity map, 0: no perturbation)", min=0.0, max=1.0)
    perturb: bool = option(False, "perturb on every call (the weak model itself); False: only inside the guidance "
                           "helper's perturbed pass")

    DENSE_EQUIVALENT: ClassVar[dict] = {"scale": 0.0, "perturb": True}

    def validate(self) -> None:
        super().validate()
        for pair in self.heads:
            if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                    or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in pair)):
                raise ValueError(f"{self.where('heads')} must hold [layer, head] pairs of indices >= 0, got {pair!r}")

    def check_model(self, *, num_layers=None, num_heads=None) -> None:
        super().check_model(num_layers=num_layers, num_heads=num_heads)
        check_indices(self.where("heads"), [layer for layer, _ in self.all_heads()], "layer", num_layers)
        check_indices(self.where("heads"), [head for _, head in self.all_heads()], "head", num_heads)
        if self.head_file and num_layers is not None:
            data = load_artifact(self.head_file, PAYLOAD, WHAT)
            if data["num_layers"] != num_layers:
                raise ValueError(f"{self.where('head_file')}: {self.head_file} lists {data['num_layers']} attention "
                                 f"modules, the model has {num_layers}")

    def all_heads(self) -> tuple[tuple[int, int], ...]:
        """Every chosen ``(layer, head)``: ``heads`` then the file's."""
        pairs = [tuple(p) for p in self.heads]
        if self.head_file:
            pairs += [p for p in heads_in_file(self.head_file) if p not in pairs]
        return tuple(pairs)


def heads_in_file(name_or_path: str) -> tuple[tuple[int, int], ...]:
    """The ``(layer, head)`` pairs marked in a head list (``softpag_heads``: ``[layers][heads]`` of 0/1)."""
    rows = load_artifact(name_or_path, PAYLOAD, WHAT)[PAYLOAD]
    return tuple((layer, head) for layer, row in enumerate(rows) for head, mark in enumerate(row) if mark)


@lru_cache(maxsize=64)
def _heads_of_layer(pairs: tuple, layer: int) -> tuple[int, ...]:
    return tuple(sorted({head for lay, head in pairs if lay == layer}))


@dataclass
class SoftPAGState(MethodState):
    """Per module: whether the perturbed pass is running, and the heads a search set (None: the config's)."""

    perturbing: bool = False
    heads: tuple | None = None
    from_config: tuple | None = None  # the config's heads of this layer, read once


def layer_heads(state) -> tuple[int, ...]:
    """This module's perturbed heads: the ones a search set, else the config's (its file read once)."""
    own = state.method_state
    if own.heads is not None:
        return tuple(own.heads)
    if own.from_config is None:
        own.from_config = _heads_of_layer(state.config.all_heads(), state.layer_index)
    return own.from_config


def blend_toward_identity(out: torch.Tensor, value: torch.Tensor, heads, scale: float) -> torch.Tensor:
    """``out [B, H, T, D]`` with heads ``heads`` replaced by ``(1 - scale)·out + scale·value`` (value per query
    head); exactly ``value`` at scale 1."""
    index = torch.tensor(heads, device=out.device)
    blended = out.index_select(1, index) * (1.0 - scale) + value.index_select(1, index) * scale
    return out.index_copy(1, index, blended)


@register_method(
    "softpag",
    config=SoftPAGConfig,
    category="head",
    families=("dit",),
    patterns=("noncausal-self", "noncausal-cross"),
    state_cls=SoftPAGState,
    paper="Ahn et al., Fine-Grained Perturbation Guidance via Attention Head Selection (HeadHunter / SoftPAG, "
          "arXiv 2506.10978)",
)
def softpag_forward(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, is_causal=False,
                    cross_attention=False, enable_gqa=False, **kwargs):
    """Chosen heads blended toward the identity map (SoftPAG) in the perturbed pass; dense otherwise."""
    state = module.patchattn
    config: SoftPAGConfig = state.config
    dense = dense_sdpa(query, key, value, attention_mask, scaling=scaling, dropout=dropout, is_causal=is_causal,
                       enable_gqa=enable_gqa)
    heads = layer_heads(state)
    on = config.perturb or state.method_state.perturbing
    call = dit_call(state, query, cross_attention)
    if not on or not heads or config.scale == 0.0 or call.role == "cross" or scheduled_dense(config, call):
        state.record(perturbed_heads=0)
        return dense, None
    if max(heads) >= query.shape[1]:
        raise ValueError(f"softpag: head {max(heads)} of layer {state.layer_index} does not exist; that attention has "
                         f"{query.shape[1]} heads")
    if value.shape[1] != query.shape[1]:  # grouped values: each query head's own
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    state.record(perturbed_heads=len(heads))
    return blend_toward_identity(dense.transpose(1, 2), value, heads, config.scale).transpose(1, 2), None
