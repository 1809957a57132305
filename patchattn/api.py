"""Public API: patch, unpatch, patched, list_methods, get_config, load."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from . import adapters
from .config import MethodConfig
from .registry import CATEGORIES, MethodSpec, all_specs, get_spec, spec_for_config

HANDLE_ATTR = "_patchattn_handle"


@dataclass
class PatchHandle:
    """What ``patch`` did: the method, its config, the adapter and the modules it patched.

    Attributes:
        method (str): registered method name.
        config (MethodConfig): the config in use (shared by every patched module).
        family (str): model family (``config.model_type`` or the DiT class).
        targets (str): ``"text"``, ``"vision"`` or ``"all"``.
        modules (list[str]): qualified names of the patched attention modules.
    """

    method: str
    config: MethodConfig
    family: str
    targets: str
    modules: list[str]
    adapter: Any = field(repr=False)
    record: Any = field(repr=False)

    @property
    def spec(self) -> MethodSpec:
        return get_spec(self.method)

    def summary(self) -> str:
        return f"patchattn: {self.method} on {len(self.modules)} attention modules of {self.family} ({self.targets})"


def _resolve(method, overrides: dict) -> tuple[MethodSpec, MethodConfig]:
    if isinstance(method, MethodConfig):
        spec = spec_for_config(method)
        return spec, method.replace(**overrides) if overrides else method
    if not isinstance(method, str):
        raise TypeError(f"method must be a registered name or a MethodConfig, got {type(method).__name__}")
    spec = get_spec(method)
    spec.config_cls.check_fields(overrides)
    return spec, spec.config_cls(**overrides)


def patch(model, method, *, targets: str = "text", **overrides) -> PatchHandle:
    """Swap the attention of ``model`` for ``method``, in place.

    Args:
        model: a transformers model of a supported family, or a diffusers DiT.
        method (str | MethodConfig): registered name (see ``list_methods()``) or a config object.
        targets (str): for vision-language models, ``"text"`` (language backbone, default), ``"vision"`` or
            ``"all"``. Ignored for DiTs (every attention module is patched).
        **overrides: config fields, e.g. ``patch(model, "streaming", window=512)``.

    Patching an already patched model replaces the first patch cleanly (it is undone first).

    Returns:
        PatchHandle describing what was patched.
    """
    spec, config = _resolve(method, overrides)
    if getattr(model, HANDLE_ATTR, None) is not None:
        unpatch(model)
    adapter = adapters.select_adapter(model)
    record = adapter.apply(model, spec, config, targets)
    family = getattr(getattr(record, "family", None), "model_type", None) or getattr(record, "family_name", "")
    handle = PatchHandle(spec.name, config, family, getattr(record, "targets", targets), list(record.modules), adapter, record)
    object.__setattr__(model, HANDLE_ATTR, handle)
    return handle


def unpatch(model) -> None:
    """Undo ``patch``: outputs, ``state_dict`` and attention implementation are exactly as before."""
    handle = getattr(model, HANDLE_ATTR, None)
    if handle is None:
        raise ValueError("this model is not patched by patchattn")
    handle.adapter.remove(model, handle.record)
    object.__delattr__(model, HANDLE_ATTR)


def get_handle(model) -> PatchHandle | None:
    return getattr(model, HANDLE_ATTR, None)


@contextlib.contextmanager
def patched(model, method, **overrides):
    """Context manager: ``with patched(model, "streaming", window=256): ...`` then restored."""
    handle = patch(model, method, **overrides)
    try:
        yield handle
    finally:
        if get_handle(model) is handle:
            unpatch(model)


def list_methods(category: str | None = None) -> list[MethodSpec]:
    """Registered methods (optionally one category: control, sparse, sink, head, moh, linear, other)."""
    if category is not None and category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; categories are {', '.join(CATEGORIES)}")
    return [s for s in all_specs() if category is None or s.category == category]


def get_config(name: str, **overrides) -> MethodConfig:
    """The default config of method ``name`` (with overrides applied)."""
    spec = get_spec(name)
    spec.config_cls.check_fields(overrides)
    return spec.config_cls(**overrides)


def load(name_or_path: str | None, method=None, *, targets: str = "text", dtype=None, adapter: str | None = None,
         merge: bool = False, **overrides):
    """Load a causal LM and its tokenizer, patched at load time.

    ``"smollm2"`` and ``"gemma3-270m"`` load the embedded models from their pip packages (no network); anything
    else is a local path for ``from_pretrained``. A model saved while patched is re-patched with its saved config
    when ``method`` is None.

    ``adapter=<output folder of patchattn train>`` loads a tuned model instead: the base model (``name_or_path``, or
    the one the run trained when None), the run's inference patch with its learned patch state (MoH routers...),
    and its LoRA adapter (``merge=True`` folds it into the weights).  ``method`` and overrides are not allowed then.

    Returns:
        (model, tokenizer)
    """
    import torch

    if adapter is not None:
        if method is not None or overrides:
            raise ValueError("load(adapter=...) applies the patch the run saved; do not pass a method or overrides")
        from .train.artifacts import load_tuned

        return load_tuned(name_or_path, adapter, dtype=dtype, merge=merge)

    from .adapters.hf import saved_config
    from .models import load_pretrained

    model, tokenizer = load_pretrained(name_or_path, dtype=dtype or torch.float32)
    if method is None:
        method = saved_config(model.config)
        if method is not None:
            targets = model.config.patchattn.get("targets", targets)
    if method is not None:
        patch(model, method, targets=targets, **overrides)
    return model, tokenizer
