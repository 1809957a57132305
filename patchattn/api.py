"""Public API: patch, unpatch, patched, list_methods, get_config, load (also of tuned models), mean_stat."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file

from . import adapters, methods  # noqa: F401  (importing the method files registers the built-in methods)
from .adapters import diffusers as dit_adapter
from .adapters.hf import saved_config
from .config import MethodConfig
from .models import load_base, load_pretrained
from .registry import CATEGORIES, MethodSpec, all_specs, get_spec, spec_for_config
from .state import get_state

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
    if adapter is not None:
        if method is not None or overrides:
            raise ValueError("load(adapter=...) applies the patch the run saved; do not pass a method or overrides")
        return load_tuned(name_or_path, adapter, dtype=dtype, merge=merge)

    model, tokenizer = load_pretrained(name_or_path, dtype=dtype or torch.float32)
    if method is None:
        method = saved_config(model.config)
        if method is not None:
            targets = model.config.patchattn.get("targets", targets)
    if method is not None:
        patch(model, method, targets=targets, **overrides)
    return model, tokenizer


def mean_stat(model, name: str) -> float | None:
    """Mean of a statistic (e.g. ``density``) that the patched modules reported on their latest call."""
    values = [s.stats[name] for s in (get_state(m) for m in model.modules()) if s is not None and name in s.stats]
    return sum(values) / len(values) if values else None


def parse_methods(text: str) -> list[tuple[str, str, dict]]:
    """'a,b' or 'a;b@x:{"top_k": 4}' -> [(label, method, overrides), ...]; the label 'b@x' keeps variants apart."""
    items = text.split(";") if (";" in text or "{" in text) else text.split(",")
    out = []
    for item in filter(None, (part.strip() for part in items)):
        label, _, overrides = item.partition(":")
        out.append((label, label.split("@")[0], json.loads(overrides) if overrides else {}))
    return out


# --------------------------------------------------------------------------------------------------------------
# DiTs saved while patched (diffusers)
# --------------------------------------------------------------------------------------------------------------
def repatch_from_config(model):
    """Patch ``model`` (a DiT or pipeline) again as its config says it was saved; returns the handle or None."""
    saved = dit_adapter.saved_patch(model)
    if saved is None:
        return None
    config = get_spec(saved["method"]).config_cls.from_dict(saved["config"])
    return patch(model, config, targets=saved.get("targets", "all"))


def load_dit(path: str, method=None, *, model_cls=None, subfolder: str | None = None, **kwargs):
    """Load a diffusers DiT saved with ``save_pretrained`` and patch it.

    Args:
        path: local folder (or Hub id) of the model; ``subfolder`` as in ``from_pretrained`` (``"transformer"``
            for a pipeline folder).
        method: a method name or ``MethodConfig``; None re-applies the patch the model was saved with (if any).
        model_cls: the diffusers class; None reads ``_class_name`` from the saved config.
        **kwargs: passed to ``from_pretrained`` (``torch_dtype``, ...).

    Returns:
        the model, patched. Parameters of the patch (``*.patchattn.*`` in a saved ``state_dict``) are loaded back
        from the folder's safetensors files.
    """
    import diffusers  # optional: only DiT users install it

    if model_cls is None:
        model_cls = getattr(diffusers, dit_adapter.read_saved_config(path, subfolder)["_class_name"])
    model = model_cls.from_pretrained(path, subfolder=subfolder, **kwargs)
    if method is not None:
        patch(model, method, targets="all")
    else:
        repatch_from_config(model)
    dit_adapter.load_patch_parameters(model, os.path.join(path, subfolder or ""))
    return model


# --------------------------------------------------------------------------------------------------------------
# Tuned models: the output folder of ``patchattn train`` (written by ``patchattn.train.artifacts``).
# --------------------------------------------------------------------------------------------------------------
ADAPTER_DIR = "adapter"
PATCH_FILE = "patch.json"
PATCH_STATE_FILE = "patch_state.safetensors"
RECIPE_FILE = "recipe.json"
PATCH_PARAM_MARK = ".patchattn."  # every learned patch parameter (MoH routers, gates) has this in its name


def apply_patch(model, patch_entry: dict):
    """``patch`` with a recipe's patch entry (``{"method": ..., fields}``)."""
    fields = {k: v for k, v in patch_entry.items() if k != "method"}
    return patch(model, patch_entry["method"], **fields)


def patch_parameters(model) -> dict[str, torch.nn.Parameter]:
    """Learned patch-state parameters by name (relative to ``model``)."""
    return {name: p for name, p in model.named_parameters() if PATCH_PARAM_MARK in name}


def read_json(path: str):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {os.path.dirname(path)!r} the output folder of a finished "
                                "`patchattn train` run?")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def load_patch_state(model, path: str) -> None:
    """Copy saved patch-state parameters into a freshly patched model; every saved and expected name must match."""
    saved = load_file(path)
    expected = patch_parameters(model)
    if set(saved) != set(expected):
        missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
        raise ValueError(f"{path} does not fit this patch: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(saved[name])


def apply_inference_patch(model, output_dir: str, patch_entry: dict | None = None):
    """Patch ``model`` with the run's inference patch and load its learned patch state (when it has any)."""
    patch_entry = patch_entry or read_json(os.path.join(output_dir, PATCH_FILE))["inference"]
    if patch_entry.get("method") == "dense":
        return  # full attention: the model's own, exactly
    apply_patch(model, patch_entry)
    if patch_parameters(model):
        load_patch_state(model, os.path.join(output_dir, PATCH_STATE_FILE))


def load_tuned(name_or_path: str | None, adapter: str, *, dtype=None, merge: bool = False):
    """(model, tokenizer): the base model, the run's inference patch and patch state, and its LoRA adapter.

    ``name_or_path=None`` takes the base model the run trained.  ``merge=True`` folds LoRA into the weights
    (``merge_and_unload``): faster, equal up to rounding.
    """
    from peft import PeftModel  # peft (and accelerate behind it) loads in seconds: only when an adapter is read

    recipe = read_json(os.path.join(adapter, RECIPE_FILE))
    trained_on = recipe["train"]["model"]
    if name_or_path is None:
        name_or_path = trained_on
    elif name_or_path != trained_on:
        warnings.warn(f"adapter {adapter!r} was trained on {trained_on!r}, loading it onto {name_or_path!r}",
                      stacklevel=3)
    dtype_name = str(dtype).replace("torch.", "") if dtype is not None else recipe["train"].get("dtype", "float32")
    model, tokenizer = load_base(name_or_path, dtype_name)
    apply_inference_patch(model, adapter)
    model = PeftModel.from_pretrained(model, os.path.join(adapter, ADAPTER_DIR))
    model.eval()
    if merge:
        model = model.merge_and_unload()
    return model, tokenizer
