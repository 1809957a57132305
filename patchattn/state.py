"""Per-module patch state and the per-model context shared by all patched modules.

``PatchState`` is an ``nn.Module`` attached to each patched attention module as ``module.patchattn``: learned
parameters (routers, gates, sink logits) live there, so ``state_dict`` and peft see them, and ``unpatch`` removes
them.  Everything else a method keeps (per-layer plans fixed at patch time, caches kept between calls) is one typed
dataclass per method, a ``MethodState`` subclass declared in the method's file, held as ``state.method_state``.  ``PatchContext`` carries what a method may need to know about the *input* rather than the layer: which
tokens are image tokens in an LVLM, the latent grid and text span of a DiT.  Adapters fill it through forward
pre-hooks; methods only read it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .config import MethodConfig
from .registry import find_spec
from .sharding import HeadShard

STATE_ATTR = "patchattn"
STATE_MARK = f".{STATE_ATTR}."  # in the state_dict name of every tensor a patch adds (MoH routers, gates...)


@dataclass
class MethodState:
    """Base of a method's typed per-module state (``PatchState.method_state``).

    Subclasses are dataclasses whose every field has a default, so ``cls()`` is a fresh state.  The tensors named in
    ``DEVICE_FIELDS`` follow the module across ``.to()`` / ``.cuda()`` / ``.half()`` as non-persistent buffers
    would; nothing here is in ``state_dict``.
    """

    DEVICE_FIELDS: ClassVar[tuple[str, ...]] = ()

    def apply_to_tensors(self, fn) -> None:
        """Apply ``fn`` (``nn.Module._apply``'s conversion) to the tensors of ``DEVICE_FIELDS``."""
        for name in self.DEVICE_FIELDS:
            value = getattr(self, name)
            if torch.is_tensor(value):
                setattr(self, name, fn(value))

    def shard_heads(self, shard) -> None:
        """Cut the per-head fields to a tensor-parallel rank's heads (``sharding.HeadShard``), once at patch time.

        Nothing by default: a state with per-head fields overrides this (``sharding.TENSOR_PARALLEL_METHODS`` lists
        the methods checked under tensor parallelism)."""


def new_method_state(config: MethodConfig) -> MethodState | None:
    """A fresh typed state of the config's method (its spec's ``state_cls``), or None when it keeps none."""
    spec = find_spec(getattr(type(config), "method", ""))
    state_cls = spec.state_cls if spec is not None else None
    return state_cls() if state_cls is not None else None


@dataclass
class TokenLayout:
    """Where the different kinds of tokens sit in one attention call's sequence.

    Attributes:
        text_slices: ``(start, stop)`` ranges of text tokens in the joint sequence (DiTs with joint attention).
        grid: latent token grid ``(frames, height, width)`` of the image/video tokens, in tokens after patchify.
        image_slice: ``(start, stop)`` of the image/video tokens in the joint sequence.
        image_token_mask: bool ``[B, T]`` marking image tokens of an LVLM's text sequence (None when no image).
    """

    text_slices: tuple[tuple[int, int], ...] = ()
    grid: tuple[int, int, int] | None = None
    image_slice: tuple[int, int] | None = None
    image_token_mask: torch.Tensor | None = None


@dataclass
class PatchContext:
    """Shared by all patched modules of one model; refreshed by the adapter's pre-hooks on each forward (except
    ``shard``, fixed when patching)."""

    family: str = ""
    kind: str = ""
    layout: TokenLayout = field(default_factory=TokenLayout)
    extras: dict[str, Any] = field(default_factory=dict)
    # Under tensor parallelism, which heads this rank's attention modules hold (``sharding.HeadShard``, set once at
    # patch time from the projections' placements); None in one process, where every module holds all its heads.
    shard: HeadShard | None = None
    # Context-parallel prefill (``patchattn.distributed``): the whole prompt's length while each call's queries are
    # one chunk of it (the last positions of the keys it gets: the prompt up to the chunk's end).  A chunk that ends
    # before the prompt does not hold the prompt's last block (``last_block_dense``), and ``density`` resolves at the
    # whole prompt.  None outside such a prefill.
    prefill_tokens: int | None = None


class PatchState(nn.Module):
    """State of one patched attention module.

    Attributes:
        config: the method config (shared by all layers unless a method gives per-layer configs).
        layer_index: index of this attention layer within its sub-model (text or vision), counted by the adapter.
        role: ``"text"``, ``"vision"`` or ``"dit"``.
        context: the model-wide ``PatchContext``.
        method_state: the method's typed state (``MethodState`` subclass; a fresh one from the method's spec unless
            given), or None for methods that keep nothing between calls.
        stats: the latest per-call statistics a method reports (``density``: fraction of the causally allowed
            key blocks it read), for the demo, eval and reports.
    """

    def __init__(self, config: MethodConfig, layer_index: int, role: str, context: PatchContext,
                 method_state: MethodState | None = None):
        super().__init__()
        self.config = config
        self.layer_index = layer_index
        self.role = role
        self.context = context
        self.method_state: MethodState | None = method_state if method_state is not None else new_method_state(config)
        self._raw_stats: dict[str, Any] = {}

    def _apply(self, fn, *args, **kwargs):
        # The method state's device tensors move with the module, as buffers do.
        super()._apply(fn, *args, **kwargs)
        if self.method_state is not None:
            self.method_state.apply_to_tensors(fn)
        return self

    def record(self, **stats) -> None:
        """Report statistics of the latest call: floats, 0-d tensors, or functions that compute one.

        Tensors and functions are kept and evaluated when read, so recording costs no device-to-host sync and no
        extra kernels in the call itself (a decode step stays short and capturable in a CUDA graph).
        """
        for name, value in stats.items():  # a loop, not a comprehension: no extra Python call in every layer
            self._raw_stats[name] = value.detach() if isinstance(value, torch.Tensor) else value

    @property
    def stats(self) -> dict[str, float]:
        return {k: float(v() if callable(v) else v) for k, v in self._raw_stats.items()}

    def __getstate__(self):
        # Recorded statistics may be functions evaluated when read (closures cannot be pickled): copies keep values.
        state = self.__dict__.copy()
        state["_raw_stats"] = self.stats
        return state

    def extra_repr(self) -> str:
        return f"method={type(self.config).method}, layer={self.layer_index}, role={self.role}"


def get_state(module: nn.Module) -> PatchState | None:
    state = module._modules.get(STATE_ATTR)
    return state if isinstance(state, PatchState) else None


def patch_tensor_names(model: nn.Module) -> list[str]:
    """``state_dict`` names of the tensors the patch added (parameters and persistent buffers of the states)."""
    return [name for name in model.state_dict() if STATE_MARK in name]


def load_patch_tensors(model: nn.Module, folder: str,
                       saved_name: Callable[[list[str]], dict[str, str]] | None = None) -> list[str]:
    """Copy the patch's tensors saved in ``folder``'s safetensors files into ``model``; returns the names not found.

    ``from_pretrained`` builds a model before any patch exists, so it cannot load these (transformers reports them
    as unexpected keys); a patched model reads them back here.  ``saved_name`` maps state_dict names to the names
    ``save_pretrained`` wrote (transformers renames some families' keys on save); tensors are copied in place, so
    parameters keep their identity (an optimiser holding them still sees them).
    """
    wanted = patch_tensor_names(model)
    if not wanted or not os.path.isdir(folder):
        return wanted
    names = saved_name(wanted) if saved_name is not None else {}
    found = _read_tensors(folder, {n: n for n in wanted} | {names.get(n, n): n for n in wanted})
    current = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, tensor in found.items():
            current[name].copy_(tensor)
    return [n for n in wanted if n not in found]


def _read_tensors(folder: str, wanted: dict[str, str]) -> dict[str, torch.Tensor]:
    """``{model name: tensor}`` for the saved names in ``wanted`` (only those tensors are read from the files)."""
    from safetensors import safe_open

    found = {}
    for file in sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")):
        with safe_open(os.path.join(folder, file), "pt") as handle:
            for key in sorted(set(handle.keys()).intersection(wanted)):
                found.setdefault(wanted[key], handle.get_tensor(key))
    return found
