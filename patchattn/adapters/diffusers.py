"""diffusers adapter: route a DiT's attention to a patchattn method, for every processor style.

How a call reaches the method
-----------------------------
Diffusers DiTs reach SDPA in two ways: processors that call ``F.scaled_dot_product_attention`` directly (SD3,
CogVideoX, PixArt) and processors that call ``dispatch_attention_fn`` (FLUX, Wan), whose ``native`` backend ends in
the same ``F.scaled_dot_product_attention``.  So one mechanism covers both, without copying or monkeypatching any
diffusers class:

- each targeted attention module gets forward pre/post hooks that enter/exit an ``_SDPARedirect``
  (a ``torch.overrides.TorchFunctionMode``) around *that module's* forward only; the mode hands every
  ``F.scaled_dot_product_attention`` call made inside it to ``spec.forward`` with the call's own arguments
  (``attn_mask``, ``dropout_p``, ``is_causal``, ``scale``), so the ``dense`` method repeats the exact same SDPA call
  and reproduces the model bit for bit.  Projections, QK-norms, RoPE and token concatenation stay diffusers' code;
- dispatcher processors whose backend never calls ``F.scaled_dot_product_attention`` (flash, sage, flex, ...) are
  pinned to ``native`` while patched (restored on unpatch); the ``native``/``_native_*`` SDPA backends are left as
  they are.  A module whose forward still makes no SDPA call (a custom processor, a backend switched after
  patching) raises instead of silently running its own attention;
- a forward pre-hook on the transformer reads the latent grid, the text length and the timestep from its inputs
  (per-family knowledge is data in ``dit_families.py``) into the shared ``PatchContext``; just before each call
  the redirect sets ``context.layout`` for the calling module's role:

  ========  ==========================================  =========================================================
  role      sequence the query covers                   ``TokenLayout``
  ========  ==========================================  =========================================================
  joint     text and image tokens in the family's order ``text_slices`` and ``image_slice`` in that sequence
  self      image/video tokens only                     ``image_slice=(0, n)``, no text slices
  cross     image/video queries; every key is text      same as self (the layout describes the queries)
  text      text tokens only (HunyuanVideo's refiner)   not patched: it runs the model's own attention
  ========  ==========================================  =========================================================

  ``context.extras`` holds ``n_text``, ``n_image``, ``grid`` and ``timestep`` of the latest transformer forward
  (kept after it returns, for gradient checkpointing's recomputation; a query length that does not match them
  raises rather than mislabel tokens).

The method is called as ``spec.forward(module, q, k, v, attn_mask, scaling=..., dropout=..., is_causal=...,
cross_attention=..., enable_gqa=...)`` with ``q [B, H, Tq, D]`` and returns ``[B, Tq, H, D]``.  A method whose
``spec.patterns`` lacks the pattern of a targeted module is refused at patch time (``NotImplementedError``), and
again at call time with the call's real ``is_causal``.

A patched DiT remembers its patch in ``model.config["patchattn"]`` (so ``save_pretrained`` writes it);
``load_dit`` / ``repatch_from_config`` patch it again after loading.
"""

from __future__ import annotations

import inspect
import math
import sys
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..config import MethodConfig
from ..registry import MethodSpec
from ..state import STATE_ATTR, PatchContext, PatchState, TokenLayout, get_state, load_patch_tensors
from .dit_families import DiTFamily, family_for_class, role_of, supported_dit_families
from .families import TARGETS

SAVED_PATCH_KEY = "patchattn"
_SDPA = torch.nn.functional.scaled_dot_product_attention
_MISSING = object()
_FUNCTIONAL = {"unflatten": torch.unflatten}  # Tensor method name -> the same computation as a torch function
# diffusers dispatcher backends that end in F.scaled_dot_product_attention (so the redirect sees their calls).
_SDPA_BACKENDS = ("native", "_native_cudnn", "_native_efficient", "_native_flash", "_native_math")


def _sdpa_arguments(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Names the arguments of an ``F.scaled_dot_product_attention`` call (a builtin: no inspectable signature)."""
    return dict(query=query, key=key, value=value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                scale=scale, enable_gqa=enable_gqa)


# --------------------------------------------------------------------------------------------------------------
# What is a DiT
# --------------------------------------------------------------------------------------------------------------
def _diffusers_class(name: str):
    """A class from diffusers, or None when diffusers is absent or not imported yet (then nothing is a DiT)."""
    if "diffusers" not in sys.modules:  # no object can be a diffusers object before diffusers is imported
        return None
    try:
        import diffusers
    except ImportError:
        return None
    return getattr(diffusers, name)


def _is_model_mixin(obj) -> bool:
    cls = _diffusers_class("ModelMixin")
    return cls is not None and isinstance(obj, cls)


def _is_pipeline(obj) -> bool:
    cls = _diffusers_class("DiffusionPipeline")
    return cls is not None and isinstance(obj, cls) and _is_model_mixin(getattr(obj, "transformer", None))


def supports(model) -> bool:
    """True for diffusers models and for pipelines that have a ``transformer`` (unsupported classes fail in apply)."""
    return _is_model_mixin(model) or _is_pipeline(model)


def transformer_of(model) -> nn.Module:
    """The DiT to patch: the model itself, or a pipeline's ``transformer``."""
    return model.transformer if _is_pipeline(model) else model


def family_of(transformer) -> DiTFamily:
    family = family_for_class(type(transformer))
    if family is None:
        raise TypeError(
            f"patchattn does not support the diffusers model {type(transformer).__name__}. "
            f"Supported DiT families: {supported_dit_families()}"
        )
    return family


def _attention_modules(transformer, family: DiTFamily) -> list[tuple[str, nn.Module, str]]:
    """(qualified name, module, role) of every attention module, each role from the family table."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    found = []
    for name, module in transformer.named_modules():
        if not isinstance(module, (Attention, AttentionModuleMixin)):
            continue
        role = role_of(family, name)
        if role is None:
            raise TypeError(
                f"{family.name}: attention module {name!r} ({type(module).__name__}) has no role in dit_families.py "
                f"(known: {family.attention_roles}); refusing to guess whether it is self- or cross-attention"
            )
        found.append((name, module, role))
    if not found:
        raise TypeError(f"found no attention modules to patch in {type(transformer).__name__}")
    return found


# --------------------------------------------------------------------------------------------------------------
# Patterns
# --------------------------------------------------------------------------------------------------------------
def _pattern(is_causal: bool, cross: bool) -> str:
    return f"{'causal' if is_causal else 'noncausal'}-{'cross' if cross else 'self'}"


def _check_pattern(spec: MethodSpec, pattern: str, where: str) -> None:
    if pattern not in spec.patterns:
        raise NotImplementedError(
            f"method {spec.name!r} does not support {pattern} attention ({where}); "
            f"it supports {', '.join(spec.patterns)}"
        )


# --------------------------------------------------------------------------------------------------------------
# Reading the layout from the transformer's input
# --------------------------------------------------------------------------------------------------------------
def _config_value(config, entry) -> int:
    """A patch size from the family table: an int, a config key, or ``"key[i]"``; None in the config means 1."""
    if isinstance(entry, int):
        return entry
    name, _, index = entry.partition("[")
    value = config[name]
    if index:
        value = value[int(index.rstrip("]"))]
    return 1 if value is None else int(value)


def _read_grid(transformer, family: DiTFamily, inputs: dict) -> tuple[tuple[int, int, int] | None, int]:
    """(grid in tokens, number of image/video tokens) of this forward."""
    hidden = inputs["hidden_states"]
    if family.latent_axes == "ids":
        # Packed latents: the sequence is row-major over the position ids (frame, row, column) in ids_input.
        ids = inputs[family.ids_input]
        ids = ids[0] if ids.ndim == 3 else ids
        grid = tuple(int(torch.unique(ids[:, axis]).numel()) for axis in range(3))
        n_image = hidden.shape[1]
        return (grid if math.prod(grid) == n_image else None), n_image
    axes = family.latent_axes
    if axes == "args":  # packed latent; the forward takes the unpatchified grid as arguments
        sizes = [int(inputs[name]) for name in family.grid_inputs]
    else:
        sizes = [hidden.shape[axes.index(a)] if a in axes else 1 for a in "FHW"]
    patch = [_config_value(transformer.config, p) for p in family.patch]
    grid = tuple(s // p for s, p in zip(sizes, patch))
    return grid, math.prod(grid)


def _layouts(family: DiTFamily, grid, n_text: int, n_image: int) -> dict[str, TokenLayout]:
    """The layout each attention role sees (see the module docstring)."""
    image_only = TokenLayout(grid=grid, image_slice=(0, n_image))
    text_only = TokenLayout(text_slices=((0, n_text),), image_slice=(0, 0))
    if not family.joint_order:
        return {"self": image_only, "cross": image_only, "text": text_only}
    if family.joint_order[0] == "text":
        joint = TokenLayout(text_slices=((0, n_text),), grid=grid, image_slice=(n_text, n_text + n_image))
    else:
        joint = TokenLayout(text_slices=((n_image, n_image + n_text),), grid=grid, image_slice=(0, n_image))
    return {"joint": joint, "self": image_only, "cross": image_only, "text": text_only}


def _layout_length(layout: TokenLayout) -> int:
    return max(stop for _, stop in (*layout.text_slices, layout.image_slice))


@dataclass
class _InputCapture:
    """Pre-hook filling ``context.extras`` from the forward's inputs (a class, not a closure, so a patched DiT can be
    pickled).

    The facts stay until the next transformer forward (not cleared at its end) because gradient checkpointing
    re-runs the attention modules during backward, after the transformer's forward has returned.
    """

    transformer: nn.Module
    family: DiTFamily
    context: PatchContext
    scheduler: object = None
    signature: inspect.Signature = field(init=False, repr=False)
    steps: StepCounter = field(init=False)

    def __post_init__(self):
        self.signature = inspect.signature(self.transformer.forward)
        self.steps = StepCounter()

    # Reading the timestep (the step count) is a host read: under torch.compile this hook runs eagerly, before the
    # compiled forward, so the attention itself stays in one graph.
    @torch.compiler.disable
    def __call__(self, _module, args, kwargs):
        inputs = self.signature.bind_partial(*args, **kwargs).arguments
        grid, n_image = _read_grid(self.transformer, self.family, inputs)
        text = inputs.get(self.family.text_input)
        n_text = text.shape[1] if isinstance(text, torch.Tensor) else 0
        timestep = inputs.get("timestep")
        self.context.extras.update(
            grid=grid, n_image=n_image, n_text=n_text, timestep=timestep,
            layouts=_layouts(self.family, grid, n_text, n_image),
            step=self.steps.advance(timestep, self._scheduler_timesteps()),
            num_steps=self._num_steps(),
        )

    def _scheduler_timesteps(self):
        timesteps = getattr(self.scheduler, "timesteps", None)
        return timesteps if isinstance(timesteps, torch.Tensor) and timesteps.numel() else None

    def _num_steps(self) -> int | None:
        fixed = self.context.extras.get(NUM_STEPS_KEY)
        if fixed is not None:
            return fixed
        timesteps = self._scheduler_timesteps()
        return None if timesteps is None else int(timesteps.numel())


NUM_STEPS_KEY = "num_steps_set"  # context.extras entry set by ``patchattn.set_denoising_steps``


@dataclass
class StepCounter:
    """Counts denoising steps from the transformer's ``timestep`` input, without touching the pipeline.

    With the pipeline's scheduler known (a patched pipeline), the step is the timestep's index in
    ``scheduler.timesteps``.  Otherwise: the first forward is step 0; a forward with the same timestep is the same
    step (classifier-free guidance run as two forwards); a lower timestep is the next step; a higher one starts a new
    generation at step 0 (every diffusers scheduler walks its timesteps downwards).
    """

    step: int | None = None
    last: float | None = None

    def advance(self, timestep, schedule=None) -> int | None:
        value = _first_value(timestep)
        if value is None:
            return self.step
        index = _index_in(schedule, value)
        if index is not None:
            self.step = index
        elif self.last is None or value > self.last:
            self.step = 0
        elif value < self.last:
            self.step += 1
        self.last = value
        return self.step


def _first_value(timestep) -> float | None:
    """The timestep of the batch's first sample as a float (one host read per transformer forward)."""
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0]) if timestep.numel() else None
    return None if timestep is None else float(timestep)


def _index_in(schedule, value: float) -> int | None:
    """Index of ``value`` in a scheduler's timesteps (compared loosely: pipelines cast and rescale them)."""
    if schedule is None:
        return None
    values = schedule.detach().float().cpu()
    close = torch.isclose(values, torch.tensor(value), rtol=1e-4, atol=1e-3).nonzero()
    if close.numel():
        return int(close[0, 0])
    # FLUX-style pipelines pass timestep / 1000 to the transformer
    close = torch.isclose(values / 1000, torch.tensor(value), rtol=1e-4, atol=1e-6).nonzero()
    return int(close[0, 0]) if close.numel() else None


def _input_capture_hook(transformer, family: DiTFamily, context: PatchContext, scheduler=None) -> _InputCapture:
    return _InputCapture(transformer, family, context, scheduler)


# --------------------------------------------------------------------------------------------------------------
# The SDPA redirect
# --------------------------------------------------------------------------------------------------------------
class _SDPARedirect(TorchFunctionMode):
    """Active only during one attention module's forward: its ``F.scaled_dot_product_attention`` calls go to the
    method, with the same arguments and the layout of this module's role."""

    def __init__(self, module: nn.Module, name: str, role: str, spec: MethodSpec, context: PatchContext):
        super().__init__()
        self.module, self.name, self.role, self.spec, self.context = module, name, role, spec, context
        self.active = False
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not _SDPA:
            # Tensor methods written in Python that end in ``super().method`` stop torch.compile's tracing inside a
            # mode (a graph break per call); the torch function is the same computation.
            if getattr(func, "__name__", None) in _FUNCTIONAL:
                func = _FUNCTIONAL[func.__name__]
            return func(*args, **kwargs)
        self.calls += 1
        return self._attend(**_sdpa_arguments(*args, **kwargs))

    def _attend(self, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        if query.ndim != 4:
            raise NotImplementedError(
                f"{self.name}: patchattn expects SDPA on [B, H, T, D] tensors, got query of shape {tuple(query.shape)}"
            )
        cross = self.role == "cross"
        _check_pattern(self.spec, _pattern(bool(is_causal), cross), f"module {self.name!r}")
        self.context.layout = self._layout(query.shape[2])
        if attn_mask is not None and attn_mask.ndim < 4:  # SDPA broadcasts from the right: leading 1s are exact
            attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.ndim) + tuple(attn_mask.shape))
        out, _ = self.spec.forward(
            self.module, query, key, value, attn_mask, scaling=scale, dropout=dropout_p, is_causal=is_causal,
            cross_attention=cross, enable_gqa=enable_gqa,
        )
        return out.transpose(1, 2)  # method returns [B, T, H, D]; the processor expects SDPA's [B, H, T, D]

    def _layout(self, query_length: int) -> TokenLayout:
        layouts = self.context.extras.get("layouts")
        if layouts is None:  # module called before any transformer forward: nothing is known about the tokens
            return TokenLayout()
        layout = layouts[self.role]
        if _layout_length(layout) != query_length:
            extras = self.context.extras
            raise RuntimeError(
                f"{self.name}: {self.role} attention over {query_length} query tokens, but the transformer input "
                f"implies {_layout_length(layout)} (text {extras['n_text']}, image {extras['n_image']}, grid "
                f"{extras['grid']}); this model variant needs its own row in patchattn/adapters/dit_families.py"
            )
        return layout

    # Forward hooks of the attention module ------------------------------------------------------------------
    def enter(self, _module, _args):
        self.calls = 0
        self.__enter__()
        self.active = True

    def exit(self, _module, _args, output):
        if not self.active:
            return
        self.active = False
        self.__exit__(None, None, None)
        if output is not None and self.calls == 0:
            processor = type(getattr(self.module, "processor", None)).__name__
            raise RuntimeError(
                f"{self.name}: the attention ran without F.scaled_dot_product_attention (processor {processor}; "
                f"attention backend changed after patching?), so method {self.spec.name!r} was not applied"
            )


# --------------------------------------------------------------------------------------------------------------
# Patch / unpatch
# --------------------------------------------------------------------------------------------------------------
@dataclass
class DiTPatch:
    """What ``apply`` changed, so ``remove`` can put it back exactly."""

    family: DiTFamily
    targets: str
    modules: list[str]
    context: PatchContext
    transformer: nn.Module
    previous_config: object = None
    hooks: list = field(default_factory=list)
    backends: list[tuple[object, object]] = field(default_factory=list)

    @property
    def family_name(self) -> str:
        return self.family.name


def _new_state(spec: MethodSpec, config, module, layer_index: int, context) -> PatchState:
    if spec.make_state is not None:
        return spec.make_state(module, config, layer_index, "dit", context)
    return PatchState(config, layer_index, "dit", context)


def _effective_backend(processor) -> str:
    """The dispatcher backend a processor's calls resolve to now (its own, else the global active one)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    backend = getattr(processor, "_attention_backend", None) or _AttentionBackendRegistry._active_backend
    return str(getattr(backend, "value", backend))


def _pin_native_backend(processor, patch: DiTPatch) -> None:
    """Dispatcher processors whose backend never calls F.sdpa (flash, sage, flex...) run ``native`` while patched.

    Backends that do end in F.sdpa (``native``, ``_native_math``...) are left alone: the redirect catches their call
    inside their own ``sdpa_kernel`` context, so ``dense`` stays bit-exact.
    """
    if not hasattr(processor, "_attention_backend") or any(p is processor for p, _ in patch.backends):
        return
    if getattr(processor, "_parallel_config", None) is not None:
        raise NotImplementedError(
            f"{type(processor).__name__} runs context-parallel attention; patchattn does not patch it (yet)"
        )
    if _effective_backend(processor) in _SDPA_BACKENDS:
        return
    from diffusers.models.attention_dispatch import AttentionBackendName

    patch.backends.append((processor, processor.__dict__.get("_attention_backend", _MISSING)))
    processor._attention_backend = AttentionBackendName.NATIVE


def _restore_backends(patch: DiTPatch) -> None:
    for processor, previous in patch.backends:
        if previous is _MISSING:
            processor.__dict__.pop("_attention_backend", None)
        else:
            processor._attention_backend = previous
    patch.backends.clear()


def apply(model, spec: MethodSpec, config: MethodConfig, targets: str = "all") -> DiTPatch:
    """Patch every attention module of a DiT (or of a pipeline's ``transformer``); ``targets`` is ignored."""
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
    transformer = transformer_of(model)
    family = family_of(transformer)
    if "dit" not in spec.families:
        raise ValueError(f"method {spec.name!r} supports model kinds {list(spec.families)}, not 'dit' ({family.name})")
    # Text-only attention (a text refiner) has no image tokens for a method to act on: it stays the model's own.
    found = [entry for entry in _attention_modules(transformer, family) if entry[2] != "text"]
    for role in sorted({role for _, _, role in found}):  # DiT attention is bidirectional; refuse before changing
        _check_pattern(spec, _pattern(False, role == "cross"), f"{role} attention of {family.name}")
    config.check_model(num_layers=len(found))  # dense_layers etc. count attention modules, in adapter order

    context = PatchContext(family=family.name, kind="dit")
    prefix = "transformer." if transformer is not model else ""
    # Every attention module of a DiT is patched whatever ``targets`` says (it has no text/vision split).
    patch = DiTPatch(family, "all", [], context, transformer, previous_config=transformer._internal_dict)
    try:
        for index, (name, module, role) in enumerate(found):
            module.add_module(STATE_ATTR, _new_state(spec, config, module, index, context))
            redirect = _SDPARedirect(module, prefix + name, role, spec, context)
            patch.hooks.append(module.register_forward_pre_hook(redirect.enter))
            patch.hooks.append(module.register_forward_hook(redirect.exit, always_call=True))
            _pin_native_backend(getattr(module, "processor", None), patch)
            patch.modules.append(prefix + name)
        capture = _input_capture_hook(transformer, family, context, getattr(model, "scheduler", None))
        patch.hooks.append(transformer.register_forward_pre_hook(capture, with_kwargs=True))
        record = {"method": spec.name, "config": config.to_dict(), "targets": patch.targets}
        transformer.register_to_config(**{SAVED_PATCH_KEY: record})
        if spec.install is not None:
            patch.hooks.extend(spec.install(transformer, patch))
    except BaseException:
        remove(model, patch)
        raise
    return patch


def set_denoising_steps(patch: DiTPatch, num_steps: int | None) -> None:
    """Tell the methods how many denoising steps a generation has (a patched pipeline's scheduler says it itself)."""
    if num_steps is not None and (not isinstance(num_steps, int) or num_steps < 1):
        raise ValueError(f"num_steps must be a positive int or None, got {num_steps!r}")
    patch.context.extras[NUM_STEPS_KEY] = num_steps


def remove(model, patch: DiTPatch) -> None:
    for hook in patch.hooks:
        hook.remove()
    patch.hooks.clear()
    for module in patch.transformer.modules():
        if get_state(module) is not None:
            del module._modules[STATE_ATTR]
    _restore_backends(patch)
    _restore_config(patch.transformer, patch.previous_config)


def _restore_config(transformer, previous) -> None:
    """Put back the config the model had, minus a patch record it was loaded with (it is unpatched now)."""
    if SAVED_PATCH_KEY in previous:
        from diffusers.configuration_utils import FrozenDict

        previous = FrozenDict({k: v for k, v in previous.items() if k != SAVED_PATCH_KEY})
    transformer._internal_dict = previous


# --------------------------------------------------------------------------------------------------------------
# Loading a DiT saved while patched
# --------------------------------------------------------------------------------------------------------------
# ``load_dit`` and ``repatch_from_config`` patch through ``patchattn.api``, so they live there (api imports
# adapters, never the reverse); ``read_saved_config`` and ``load_patch_parameters`` are their helpers here.
def saved_patch(model) -> dict | None:
    """The ``{"method", "config", "targets"}`` record a patched DiT saved in its config, if any."""
    saved = transformer_of(model).config.get(SAVED_PATCH_KEY)
    return saved if isinstance(saved, dict) else None


def read_saved_config(path: str, subfolder: str | None) -> dict:
    """A saved model's config.json (local or Hub), through diffusers' own config loader."""
    from diffusers.configuration_utils import ConfigMixin

    class _SavedConfig(ConfigMixin):
        config_name = "config.json"

    return _SavedConfig.load_config(path, subfolder=subfolder)


def load_patch_parameters(model, folder: str) -> None:
    """``from_pretrained`` drops the patch's own tensors (the classes do not know them): read them back."""
    load_patch_tensors(model, folder)
