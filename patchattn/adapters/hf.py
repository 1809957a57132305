"""transformers adapter: route a model's attention to a patchattn method through the attention registry.

Every registered method ``m`` is registered in transformers' ``AttentionInterface`` **and**
``AttentionMaskInterface`` as ``patchattn_m`` (a name missing from the mask registry makes transformers pass
``attention_mask=None``, silently dropping causal and padding masks).  Patching then only switches the
``_attn_implementation`` of the targeted (sub-)configs and attaches a ``PatchState`` to each targeted attention
module; projections, q/k norms, RoPE variants, KV-cache updates and sliding windows stay the model's own code.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..checks import InputCheckHooks, check_inputs
from ..config import MethodConfig
from ..methods._rows import KeyBounds, key_bounds, keys_in_use
from ..registry import HF_PREFIX, MethodSpec, on_register
from ..sharding import check_supported, model_shard, place_state, shard_state
from ..state import STATE_ATTR, PatchContext, PatchState, get_state, load_patch_tensors
from . import PATCH_LOCK
from .families import HF_FAMILIES, TARGETS, HFFamily, supported_hf_families

SAVED_PATCH_KEY = "patchattn"


def _is_transformers_model(model) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


# --------------------------------------------------------------------------------------------------------------
# Registration with transformers (at import, and for every method registered later)
# --------------------------------------------------------------------------------------------------------------
def _register_with_transformers(spec: MethodSpec) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(spec.hf_name, _make_entry(spec))
    AttentionMaskInterface.register(spec.hf_name, spec.mask_builder or sdpa_mask)


def _make_entry(spec: MethodSpec):
    def attention(module, query, key, value, attention_mask, **kwargs):
        state = _ensure_state(module, spec)
        check_pattern(spec, module)
        if query.shape[0] == 0:
            return query.new_empty(0, query.shape[2], query.shape[1], value.shape[-1]), None
        check_inputs(spec.name, query, key, value, state)
        rows_path = spec.key_bounds and not density_per_length(state.config)
        if rows_path and takes_key_bounds(module, query, attention_mask):
            return spec.forward(module, query, key, value, attention_mask, key_bounds=key_bounds(attention_mask),
                                **kwargs)
        kept = state.method_state
        if (rows_path and getattr(kept, "DECODE_BUFFERS", False) and fills_static_cache(module, query, key)
                and getattr(kept, "kept_keys", None) is None):  # a bounded cache hands its own slots
            warm_up_rows_decode(spec, module, query, key, value, attention_mask, kwargs)
        key, value, attention_mask = causal_keys(module, query, key, value, attention_mask)
        return spec.forward(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"{spec.hf_name}_attention"
    attention.__doc__ = spec.forward.__doc__
    return attention


def density_per_length(config) -> bool:
    """Whether ``density=`` sets the method's fields from each call's length (``DENSITY_FIELDS``), which a row
    length known only on the device cannot give: those decode steps keep the host path."""
    return getattr(config, "density", None) is not None and bool(getattr(config, "DENSITY_FIELDS", ()))


def takes_key_bounds(module, query, attention_mask) -> bool:
    """A causal decode step (one new token) with a mask: its rows' real keys are read on the device
    (``KeyBounds``), whatever the cache, so the step has no host read (it compiles whole, replays in a CUDA graph)."""
    return (getattr(module, "is_causal", True) and query.shape[2] == 1 and attention_mask is not None
            and attention_mask.dtype == torch.bool and attention_mask.ndim == 4)


def fills_static_cache(module, query, key) -> bool:
    """A causal prefill into a cache longer than the prompt (a static cache's capacity)."""
    return getattr(module, "is_causal", True) and 1 < query.shape[2] < key.shape[2]


def warm_up_rows_decode(spec, module, query, key, value, attention_mask, kwargs) -> None:
    """Run one decode step of the prompt's last token over the whole capacity, before the prefill, and drop it.

    The decode steps that follow keep device buffers sized by the capacity (compressed key caches, per-row lists)
    and update them in place.  Made here, eagerly, those buffers belong to no compiled graph; made in the first
    compiled step they would be outputs of a CUDA graph, which its next replay overwrites.  The prefill then marks
    them stale, so the first real step refills them in place: the tokens do not change."""
    last = query[:, :, -1:]
    if attention_mask is None:  # no padding: every row's real keys are the prompt
        lengths = torch.full((query.shape[0],), query.shape[2], dtype=torch.int32, device=query.device)
        bounds = KeyBounds(torch.zeros_like(lengths), lengths, lengths)
    else:
        bounds = key_bounds(attention_mask)
    spec.forward(module, last, key, value, None, key_bounds=bounds, **kwargs)


def causal_keys(module, query, key, value, attention_mask):
    """The keys, values and mask of a causal call, cut to the keys its queries can see.

    Methods read a call as its queries being the *last* positions of the keys.  A static cache breaks that: its
    slots after the newest token are empty.  Its prefill comes without a mask (transformers relies on SDPA's
    ``is_causal``: query ``i`` sees keys up to ``i``), its decode steps with a mask hiding the empty slots."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if not getattr(module, "is_causal", True) or q_len >= kv_len:
        return key, value, attention_mask
    if attention_mask is None:
        visible = q_len if q_len > 1 else kv_len
    else:
        visible = keys_in_use(attention_mask, q_len, kv_len)
    if visible >= kv_len:
        return key, value, attention_mask
    mask = None if attention_mask is None else attention_mask[..., :visible]
    return key[:, :, :visible], value[:, :, :visible], mask


def check_pattern(spec: MethodSpec, module: nn.Module) -> None:
    """NotImplementedError when the module needs an attention pattern the method does not support."""
    pattern = "causal-self" if getattr(module, "is_causal", True) else "noncausal-self"
    if pattern not in spec.patterns:
        raise NotImplementedError(
            f"method {spec.name!r} supports the attention patterns {list(spec.patterns)}, but "
            f"{type(module).__name__} needs {pattern!r}; patch the text backbone (targets='text') or pick a method "
            "that supports it (patchattn list)"
        )


def _ensure_state(module: nn.Module, spec: MethodSpec) -> PatchState:
    """The module's state; created lazily for models loaded with ``attn_implementation="patchattn_<m>"``."""
    state = module._modules.get(STATE_ATTR)  # get_state's lookup, inline: this runs in every layer of every call
    if isinstance(state, PatchState) and type(state.config).method == spec.name:
        return state
    with PATCH_LOCK:
        state = get_state(module)  # another thread may have created it meanwhile
        if state is not None and type(state.config).method == spec.name:
            return state
        saved = saved_config(getattr(module, "config", None), spec)
        role = "vision" if getattr(module, "is_causal", True) is False else "text"
        state = _new_state(spec, saved or spec.config_cls(), module, getattr(module, "layer_idx", None) or 0, role,
                           PatchContext())
        _fit_states(spec, "llm" if role == "text" else "lvlm", state.context, [(module, state)])
        if getattr(getattr(module, "config", None), "_attn_implementation", None) != spec.hf_name:
            return state  # another thread changed the patch during this call: finish it without touching the model
        module.add_module(STATE_ATTR, state)
    if saved is not None and next(state.parameters(), None) is not None:
        _warn_parameters_not_restored(module, spec, state)
    return state


def _warn_parameters_not_restored(module: nn.Module, spec: MethodSpec, state: PatchState) -> None:
    names = ", ".join(sorted(name for name, _ in state.named_parameters()))
    warnings.warn(
        f"patchattn: this model was saved patched with {spec.name!r}, whose learned parameters ({names} of each "
        f"{type(module).__name__}) a plain from_pretrained cannot restore: transformers builds the model before the "
        "patch adds them (and reports them as unexpected keys), so they start from their initial values now. Load "
        "the folder with patchattn.load(path), or call patchattn.get_handle(model) right after from_pretrained (before "
        "any call), to restore the saved ones.",
        UserWarning,
        stacklevel=2,
    )


def _fit_states(spec, kind: str, context: PatchContext, states: list) -> None:
    """Cut the new states to this rank's heads under tensor parallelism (``context.shard``, read once here) and put
    each on its layer's device (``device_map`` may spread the layers over devices)."""
    shard = model_shard([module for module, _ in states])
    if shard is not None:
        check_supported(spec.name, kind)
        context.shard = shard
        for _, state in states:
            shard_state(state, shard)
    for module, state in states:
        place_state(state, module)


def _new_state(spec, config, module, layer_index, role, context) -> PatchState:
    if spec.make_state is not None:
        return spec.make_state(module, config, layer_index, role, context)
    return PatchState(config, layer_index, role, context)


def saved_config(model_config, spec: MethodSpec | None = None) -> MethodConfig | None:
    """The method config saved in a (sub-)config by a patched model's ``save_pretrained``, if any."""
    saved = getattr(model_config, SAVED_PATCH_KEY, None) if model_config is not None else None
    if not isinstance(saved, dict):
        return None
    from ..registry import get_spec

    saved_spec = get_spec(saved["method"])
    if spec is not None and saved_spec.name != spec.name:
        return None
    return saved_spec.config_cls.from_dict(saved["config"])


on_register(_register_with_transformers)


# --------------------------------------------------------------------------------------------------------------
# Patch / unpatch
# --------------------------------------------------------------------------------------------------------------
@dataclass
class HFPatch:
    """What ``apply`` changed, so ``remove`` can put it back exactly."""

    family: HFFamily
    targets: str
    modules: list[str]
    context: PatchContext
    previous_impl: list[tuple[object, str | None]] = field(default_factory=list)
    hooks: list = field(default_factory=list)
    saved_attrs: list[object] = field(default_factory=list)


def family_of(model) -> HFFamily:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = HF_FAMILIES.get(model_type)
    if family is None:
        raise TypeError(
            f"patchattn does not support transformers model type {model_type!r} ({type(model).__name__}). "
            f"Supported families: {supported_hf_families()}; diffusers DiTs are supported through the 'dit' extra."
        )
    return family


def _all_configs(config) -> list:
    """The config and all its nested sub-configs, each once."""
    found, stack = [], [config]
    while stack:
        c = stack.pop()
        if any(c is f for f in found):
            continue
        found.append(c)
        for key in getattr(c, "sub_configs", {}) or {}:
            sub = getattr(c, key, None)
            if sub is not None and hasattr(sub, "_attn_implementation_internal"):
                stack.append(sub)
    return found


def _target_configs(model, family: HFFamily, targets: str) -> dict[str, list]:
    """Configs to switch, by role."""
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
    top = model.config
    if family.kind == "llm":
        if targets == "vision":
            raise ValueError(f"targets='vision' needs a vision-language model; {family.model_type} has no vision tower")
        return {"text": _all_configs(top), "vision": []}
    text, vision = getattr(top, family.text_config), getattr(top, family.vision_config)
    by_role = {"text": _all_configs(text), "vision": _all_configs(vision)}
    if targets == "all":
        by_role["text"].append(top)
    else:
        by_role[{"text": "vision", "vision": "text"}[targets]] = []
    return by_role


def _is_attention_module(module: nn.Module) -> bool:
    return type(module).__name__.endswith("Attention") and getattr(module, "config", None) is not None


def apply(model, spec: MethodSpec, config: MethodConfig, targets: str = "text") -> HFPatch:
    family = family_of(model)
    if family.kind not in spec.families:
        raise ValueError(
            f"method {spec.name!r} supports model kinds {list(spec.families)}, not {family.kind!r} ({family.model_type})"
        )
    by_role = _target_configs(model, family, targets)
    role_of = {id(c): role for role, configs in by_role.items() for c in configs}
    context = PatchContext(family=family.model_type, kind=family.kind)
    patch = HFPatch(family, targets, [], context)
    patch.previous_impl = [(c, _unpatched_impl(model, c)) for c in _all_configs(model.config)]

    # Every state is made before any is attached: a method refusing one layer leaves the model untouched.
    counters, states = {"text": 0, "vision": 0}, []
    for name, module in model.named_modules():
        role = role_of.get(id(getattr(module, "config", None))) if _is_attention_module(module) else None
        if role is None:
            continue
        index = getattr(module, "layer_idx", None)
        index = counters[role] if index is None else index
        counters[role] += 1
        states.append((name, module, _new_state(spec, config, module, index, role, context)))
    if not states:
        raise TypeError(f"found no attention modules to patch in {type(model).__name__} for targets={targets!r}")
    _fit_states(spec, family.kind, context, [(module, state) for _, module, state in states])
    for name, module, state in states:
        module.add_module(STATE_ATTR, state)
        patch.modules.append(name)

    for c in (c for configs in by_role.values() for c in configs):
        c._attn_implementation_internal = spec.hf_name
    _remember_patch(model, spec, config, targets, by_role, patch)
    patch.hooks.extend(InputCheckHooks(context).register(model))  # the NaN/Inf check: one host read per forward
    if family.media_token_attrs:
        patch.hooks.append(model.register_forward_pre_hook(_media_token_hook(model, family, context), with_kwargs=True))
    if spec.install is not None:
        try:
            patch.hooks.extend(spec.install(model, patch))
        except BaseException:
            remove(model, patch)
            raise
    return patch


def _unpatched_impl(model, config) -> str | None:
    """The implementation to restore: the current one, unless the model was loaded already patched."""
    impl = config._attn_implementation_internal
    if isinstance(impl, str) and impl.startswith(HF_PREFIX):
        return "sdpa" if getattr(model, "_supports_sdpa", False) else "eager"
    return impl


def _remember_patch(model, spec, config, targets, by_role, patch: HFPatch) -> None:
    """Write the patch into the configs so ``save_pretrained`` carries it and ``from_pretrained`` re-patches.

    ``attn_implementation`` in a saved config.json is read back by transformers as the model's implementation,
    so a saved patched model loads patched (after ``import patchattn``); ``patchattn`` holds the method config.
    """
    record = {"method": spec.name, "config": config.to_dict(), "targets": targets}
    for c in {id(c): c for c in [model.config, *by_role["text"], *by_role["vision"]]}.values():
        setattr(c, SAVED_PATCH_KEY, record)
        patch.saved_attrs.append(c)
    role_configs = {id(c) for configs in by_role.values() for c in configs}
    model.config.attn_implementation = _saved_impl_tree(model.config, role_configs, spec.hf_name)


def _saved_impl_tree(config, patched_ids: set, name: str):
    """``attn_implementation`` as transformers reads it at load: a name, or a per-sub-config dict."""
    subs = {k: getattr(config, k) for k in getattr(config, "sub_configs", {}) or {} if getattr(config, k, None)}
    own = name if id(config) in patched_ids else config._attn_implementation_internal
    if not subs:
        return own
    tree = {"": own, **{k: _saved_impl_tree(sub, patched_ids, name) for k, sub in subs.items()}}
    values = {v for v in tree.values() if isinstance(v, str)}
    return own if values == {own} and all(isinstance(v, str) for v in tree.values()) else tree


@dataclass
class _MediaTokenHook:
    """Forward pre-hook of an LVLM: marks the image/video tokens of each prefill in the shared context.

    A class rather than a closure, so a patched model can be deep-copied and pickled.
    """

    token_ids: list[int]
    context: PatchContext

    def __call__(self, _module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        # Only a prefill (more than one new token) defines where the image tokens are; decoding keeps it.
        if isinstance(input_ids, torch.Tensor) and input_ids.ndim == 2 and input_ids.shape[1] > 1:
            # Compared with Python ints: a tensor of the ids made here would be host data copied to the GPU, which
            # PyTorch ends with a stream synchronize (the host would wait for the queue to drain every forward).
            mask = torch.zeros_like(input_ids, dtype=torch.bool)
            for token_id in self.token_ids:
                mask |= input_ids == token_id
            self.context.layout.image_token_mask = mask


def _media_token_hook(model, family: HFFamily, context: PatchContext) -> _MediaTokenHook:
    ids = [getattr(model.config, a) for a in family.media_token_attrs if getattr(model.config, a, None) is not None]
    return _MediaTokenHook(ids, context)


def remove(model, patch: HFPatch) -> None:
    for module in list(model.modules()):  # a snapshot: the loop removes submodules
        if get_state(module) is not None:
            del module._modules[STATE_ATTR]
    for c, impl in patch.previous_impl:
        c._attn_implementation_internal = impl
    for c in patch.saved_attrs:
        for attr in (SAVED_PATCH_KEY, "attn_implementation"):
            if attr in c.__dict__:
                delattr(c, attr)
    for hook in patch.hooks:
        hook.remove()


def supports(model) -> bool:
    return _is_transformers_model(model)


# --------------------------------------------------------------------------------------------------------------
# Models that run a method through their config alone (loaded from a folder saved while patched)
# --------------------------------------------------------------------------------------------------------------
def loaded_patch(model) -> tuple[MethodSpec, MethodConfig, str] | None:
    """``(spec, config, targets)`` of a model whose configs name a patchattn implementation although ``patch`` never
    ran on it (``from_pretrained`` of a folder saved while patched, or ``attn_implementation="patchattn_<m>"``);
    None when its configs name none.  The config is the saved one, else the method's defaults (what the lazily
    created states run)."""
    family = HF_FAMILIES.get(getattr(getattr(model, "config", None), "model_type", None))
    if family is None:
        return None
    top = model.config
    by_role = {"text": top} if family.kind == "llm" else {
        "text": getattr(top, family.text_config), "vision": getattr(top, family.vision_config)}
    methods = {role: impl[len(HF_PREFIX):] for role, c in by_role.items()
               if isinstance(impl := c._attn_implementation_internal, str) and impl.startswith(HF_PREFIX)}
    if not methods:
        return None
    if len(set(methods.values())) > 1:
        raise ValueError(f"this {family.model_type} model runs different patchattn methods per tower ({methods}); "
                         "patchattn handles one method per model: patch it explicitly (patchattn.patch)")
    from ..registry import get_spec

    spec = get_spec(next(iter(methods.values())))
    roles = [role for role in by_role if role in methods]
    config = next((c for c in (saved_config(top, spec), *(saved_config(by_role[r], spec) for r in roles)) if c), None)
    targets = "all" if len(roles) == 2 else roles[0]
    return spec, config or spec.config_cls(), targets


def saved_names(model, names: list[str]) -> dict[str, str]:
    """The names ``save_pretrained`` gives these ``state_dict`` entries (transformers renames some families' keys on
    save, e.g. LLaVA's ``model.language_model.*`` becomes ``language_model.model.*``); unchanged names are left out."""
    try:
        from transformers.core_model_loading import revert_weight_conversion

        tensors = model.state_dict(keep_vars=True)
        name_of = {id(tensors[n]): n for n in names}
        reverted = revert_weight_conversion(model, {n: tensors[n] for n in names})
    except Exception:  # noqa: BLE001 -- best effort: names not found are reported by the caller
        return {}
    return {name_of[id(t)]: saved for saved, t in reverted.items() if id(t) in name_of and name_of[id(t)] != saved}


def load_saved_tensors(model, folder: str) -> list[str]:
    """Read the patch's tensors back from a folder written by ``save_pretrained``; returns the names not found."""
    return load_patch_tensors(model, folder, lambda names: saved_names(model, names))
