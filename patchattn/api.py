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
from .config import MethodConfig, check_model_fit
from .models import load_base, load_pretrained
from .registry import CATEGORIES, MethodSpec, all_specs, get_spec, spec_for_config
from .state import STATE_ATTR, STATE_MARK, get_state, patch_tensor_names

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
        adapter_name (str): the adapter module that applied the patch (``"hf"``, ``"diffusers"``); held by name so
            a patched model can be deep-copied, pickled and ``torch.save``-d.
    """

    method: str
    config: MethodConfig
    family: str
    targets: str
    modules: list[str]
    adapter_name: str = field(repr=False)
    record: Any = field(repr=False)

    @property
    def spec(self) -> MethodSpec:
        return get_spec(self.method)

    @property
    def adapter(self):
        return adapters.adapter_module(self.adapter_name)

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


def _unwrap(model):
    """The model patchattn patches: a peft wrapper's base model (the wrapper calls it, so it runs patched too)."""
    while type(model).__module__.split(".")[0] == "peft" and callable(getattr(model, "get_base_model", None)):
        model = model.get_base_model()
    return model


def _apply(model, adapter, spec: MethodSpec, config: MethodConfig, targets: str) -> PatchHandle:
    record = adapter.apply(model, spec, config, targets)
    family = getattr(getattr(record, "family", None), "model_type", None) or getattr(record, "family_name", "")
    handle = PatchHandle(spec.name, config, family, getattr(record, "targets", targets), list(record.modules),
                         adapter.__name__.rsplit(".", 1)[-1], record)
    object.__setattr__(model, HANDLE_ATTR, handle)
    return handle


def patch(model, method, *, targets: str = "text", **overrides) -> PatchHandle:
    """Swap the attention of ``model`` for ``method``, in place.

    Args:
        model: a transformers model of a supported family, or a diffusers DiT; a peft model wrapping one patches
            the model it wraps.
        method (str | MethodConfig): registered name (see ``list_methods()``) or a config object.
        targets (str): for vision-language models, ``"text"`` (language backbone, default), ``"vision"`` or
            ``"all"``. Ignored for DiTs (every attention module is patched).
        **overrides: config fields, e.g. ``patch(model, "streaming", window=512)``.

    Patching an already patched model replaces the first patch cleanly (it is undone first; if the new patch is
    refused, the first one stays).

    Returns:
        PatchHandle describing what was patched.
    """
    spec, config = _resolve(method, overrides)
    model = _unwrap(model)
    check_model_fit(config, model, targets)  # layer / head indices the model lacks fail before anything changes
    with adapters.PATCH_LOCK:
        adapter = adapters.select_adapter(model)
        previous = get_handle(model)
        previous_states = _suspend(model, previous)
        try:
            return _apply(model, adapter, spec, config, targets)
        except BaseException:
            _resume(model, previous, previous_states)  # a patch the model refuses leaves the previous one in place
            raise


def unpatch(model) -> None:
    """Undo ``patch``: outputs, ``state_dict`` and attention implementation are exactly as before.

    A model loaded from a folder saved while patched (or with ``attn_implementation="patchattn_<m>"``) is
    unpatched to SDPA (eager for models without SDPA).
    """
    model = _unwrap(model)
    with adapters.PATCH_LOCK:
        handle = get_handle(model)
        if handle is None:
            raise ValueError("this model is not patched by patchattn")
        handle.adapter.remove(model, handle.record)
        object.__delattr__(model, HANDLE_ATTR)


def get_handle(model) -> PatchHandle | None:
    """The patch of ``model`` (of the model a peft wrapper wraps), or None when it runs no patchattn method.

    A model that runs a method through its config alone -- ``from_pretrained`` of a folder saved while patched, or
    ``attn_implementation="patchattn_<m>"`` -- gets its handle here: every targeted module gets its state now (the
    ones already created by a call are kept), and, when none existed yet, the patch's saved parameters (MoH
    routers...) are read back from the folder it was loaded from.
    """
    model = _unwrap(model)
    handle = getattr(model, HANDLE_ATTR, None)
    if handle is not None:
        return handle
    with adapters.PATCH_LOCK:
        return getattr(model, HANDLE_ATTR, None) or _adopt(model)


def _adopt(model) -> PatchHandle | None:
    """A handle for a model patched through its config alone (see ``get_handle``), or None."""
    try:
        adapter = adapters.select_adapter(model)
    except TypeError:
        return None
    loaded = getattr(adapter, "loaded_patch", None)
    found = loaded(model) if loaded is not None else None
    if found is None:
        return None
    spec, config, targets = found
    running, saved = _states(model), saved_config(model.config, spec)
    handle = _apply(model, adapter, spec, config, targets)
    if running:
        _put_back(model, handle, running)
    else:
        _restore_saved_tensors(model, handle, saved, getattr(model.config, "_name_or_path", None))
    return handle


def _root(model, handle: PatchHandle):
    """The module tree the patch lives in (a pipeline's ``transformer`` for DiTs)."""
    return getattr(handle.record, "transformer", model) if handle is not None else model


def _states(model, handle: PatchHandle | None = None) -> dict[int, Any]:
    """The patch states of ``model`` by the id of the module holding them."""
    root = _root(model, handle)
    if not isinstance(root, torch.nn.Module):
        return {}
    return {id(m): s for m in root.modules() if (s := get_state(m)) is not None}


def _put_back(model, handle: PatchHandle, states: dict[int, Any]) -> None:
    """Replace the states a fresh apply created by the ones that ran before (same objects: trained parameters and
    an optimiser holding them stay valid); they join the fresh patch's shared context."""
    for module in _root(model, handle).modules():
        fresh, old = get_state(module), states.get(id(module))
        if fresh is not None and old is not None and old is not fresh and type(old.config) is type(fresh.config):
            old.context = fresh.context
            module.add_module(STATE_ATTR, old)


def _restore_saved_tensors(model, handle: PatchHandle, saved: MethodConfig | None, folder) -> None:
    """Read the patch's tensors back from the folder the model was loaded from, if it was saved with this patch
    (``saved``: the config its folder recorded)."""
    restore = getattr(handle.adapter, "load_saved_tensors", None)
    if restore is None or saved != handle.config or not patch_tensor_names(model) or not isinstance(folder, str) \
            or not os.path.isdir(folder):
        return
    missing = restore(model, folder)
    if missing:
        warnings.warn(f"patchattn: {folder!r} holds no saved value for {len(missing)} parameters of the "
                      f"{handle.method} patch (e.g. {missing[0]!r}); they keep their initial values", stacklevel=3)


@contextlib.contextmanager
def _set_aside(model):
    """Inside the block the model's patch (if any) is suspended; on exit whatever was patched inside is undone and the
    suspended patch comes back with the same handle and state objects (learned parameters keep their values)."""
    with adapters.PATCH_LOCK:
        handle = get_handle(model)
        states = _suspend(model, handle)
    try:
        yield
    finally:
        with adapters.PATCH_LOCK:
            if get_handle(model) is not None:
                unpatch(model)
            _resume(model, handle, states)


@contextlib.contextmanager
def patched(model, method, **overrides):
    """Context manager: ``with patched(model, "streaming", window=256): ...``; on exit the model is as it was.

    Blocks nest: leaving an inner block puts back the patch of the outer one (the same handle and state objects,
    so learned parameters keep their values), or no patch when there was none -- whatever was patched or unpatched
    inside the block.  A patch that is refused leaves the outer one in place.
    """
    model = _unwrap(model)
    with _set_aside(model):
        yield patch(model, method, **overrides)


@contextlib.contextmanager
def unpatched(model):
    """The model's own attention inside the block (a dense teacher pass, say); on exit the same patch is back.

    The patch comes back with the same handle and state objects, so learned patch parameters (and an optimiser
    holding them) stay valid; they are not in the model inside the block.  An unpatched model is left as it is.
    """
    model = _unwrap(model)
    with _set_aside(model):
        yield model


def _suspend(model, handle: PatchHandle | None) -> dict[int, Any]:
    """Unpatch, keeping the states so ``_resume`` can put the same patch back."""
    if handle is None:
        return {}
    states = _states(model, handle)
    unpatch(model)
    return states


def _resume(model, handle: PatchHandle | None, states: dict[int, Any]) -> None:
    if handle is None:
        return
    fresh = _apply(model, handle.adapter, handle.spec, handle.config, handle.targets)
    handle.record, handle.modules = fresh.record, fresh.modules
    _put_back(model, handle, states)
    object.__setattr__(model, HANDLE_ATTR, handle)


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
    when ``method`` is None, with the parameters it saved (MoH routers...); they are also read back when ``method``
    and overrides give exactly the saved config.

    ``adapter=<output folder of patchattn train>`` loads a tuned model instead: the base model (``name_or_path``, or
    the one the run trained when None), the run's inference patch with its learned patch state (MoH routers...),
    and its LoRA adapter (``merge=True`` folds it into the weights).  ``method`` and overrides are not allowed then.
    The output folder of a DiT distillation run gives ``(transformer, None)`` (see ``load_tuned_dit``).

    Returns:
        (model, tokenizer)
    """
    if adapter is not None:
        if method is not None or overrides:
            raise ValueError("load(adapter=...) applies the patch the run saved; do not pass a method or overrides")
        return load_tuned(name_or_path, adapter, dtype=dtype, merge=merge)

    model, tokenizer = load_pretrained(name_or_path, dtype=dtype or torch.float32)
    saved = saved_config(model.config)
    if method is None and not overrides:
        get_handle(model)  # saved while patched: that patch, with its saved parameters (MoH routers...)
        return model, tokenizer
    if method is None and saved is not None:
        method, targets = saved, model.config.patchattn.get("targets", targets)
    if method is not None:
        handle = patch(model, method, targets=targets, **overrides)
        _restore_saved_tensors(model, handle, saved, getattr(model.config, "_name_or_path", None))
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


def set_denoising_steps(model, num_steps: int | None) -> None:
    """Tell a patched DiT how many denoising steps each generation has (``None``: unknown again).

    Needed only for schedules that count from the end (``dense_last_steps``) when the transformer is patched
    alone; a patched pipeline reads the count from its scheduler.
    """
    model = _unwrap(model)
    handle = get_handle(model)
    if handle is None or handle.adapter_name != "diffusers":
        raise ValueError("set_denoising_steps needs a DiT (or pipeline) patched by patchattn.patch")
    dit_adapter.set_denoising_steps(handle.record, num_steps)


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
PATCH_PARAM_MARK = STATE_MARK  # every learned patch parameter (MoH routers, gates) has this in its name


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
    (``merge_and_unload``): faster, equal up to rounding.  A DiT distillation run gives ``(transformer, None)``
    (see ``load_tuned_dit``).
    """
    recipe = read_json(os.path.join(adapter, RECIPE_FILE))
    if recipe["train"].get("kind") == DIT_DISTILL_KIND:
        return load_tuned_dit(name_or_path, adapter, recipe, dtype=dtype, merge=merge), None
    model, tokenizer = load_base(*_tuned_base(name_or_path, adapter, recipe, dtype))
    return _with_adapter(model, adapter, merge), tokenizer


def _tuned_base(name_or_path: str | None, adapter: str, recipe: dict, dtype) -> tuple[str, str]:
    """(base model to load, dtype name): the run's own unless one is given (a warning when it differs)."""
    trained_on = recipe["train"]["model"]
    if name_or_path is None:
        name_or_path = trained_on
    elif name_or_path != trained_on:
        warnings.warn(f"adapter {adapter!r} was trained on {trained_on!r}, loading it onto {name_or_path!r}",
                      stacklevel=4)
    dtype_name = str(dtype).replace("torch.", "") if dtype is not None else recipe["train"].get("dtype", "float32")
    return name_or_path, dtype_name


def _with_adapter(model, adapter: str, merge: bool):
    """``model`` with the run's inference patch, patch state and LoRA adapter, in eval mode (LoRA merged if asked)."""
    from peft import PeftModel  # peft (and accelerate behind it) loads in seconds: only when an adapter is read

    apply_inference_patch(model, adapter)
    model = PeftModel.from_pretrained(model, os.path.join(adapter, ADAPTER_DIR))
    model.eval()
    return model.merge_and_unload() if merge else model


DIT_DISTILL_KIND = "dit_distill"  # train.json ``kind`` of a DiT distillation run (patchattn.train.dit)


def load_tuned_dit(name_or_path: str | None, adapter: str, recipe: dict | None = None, *, dtype=None,
                   merge: bool = False):
    """The tuned transformer of a DiT distillation run: base DiT (``tiny-<family>`` or a local diffusers folder;
    None: the one the run trained), the run's inference patch and patch state, its LoRA adapter (peft), eval mode.
    """
    from .dit_models import load_dit_base

    recipe = recipe or read_json(os.path.join(adapter, RECIPE_FILE))
    model = load_dit_base(*_tuned_base(name_or_path, adapter, recipe, dtype))
    return _with_adapter(model, adapter, merge)
