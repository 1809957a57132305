"""The method registry: one ``MethodSpec`` per registered attention method.

A method file declares a config class and an attention function and registers them with ``@register_method``
(a block-sparse method registers its block selector instead, with ``methods._sparse.register_sparse_method``).
Everything else (adapters, CLI, demo, tests, docs) discovers methods from here, so adding a method is one new file
plus one import line in ``patchattn/methods/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .config import MethodConfig, closest

CATEGORIES = ("control", "sparse", "sink", "head", "moh", "linear", "other")
FAMILY_KINDS = ("llm", "lvlm", "dit")
# Attention patterns after the CAB benchmark's taxonomy: (causal?, self?).
PATTERNS = ("causal-self", "noncausal-self", "causal-cross", "noncausal-cross")
HF_PREFIX = "patchattn_"


@dataclass(frozen=True)
class MethodSpec:
    """What the rest of the package needs to know about one method.

    Attributes:
        name: registered name (lower-case, ``[a-z0-9_]``); transformers sees it as ``patchattn_<name>``.
        config_cls: the ``MethodConfig`` subclass holding the method's knobs and paper defaults.
        forward: attention function with transformers' signature
            ``forward(module, query, key, value, attention_mask, *, scaling, dropout=0.0, **kwargs) -> (out, None)``,
            query ``[B, Hq, Tq, D]``, key/value ``[B, Hkv, Tk, D]``, out ``[B, Tq, Hq, D]``.
        category: one of ``CATEGORIES``.
        families: model kinds it supports, subset of ``FAMILY_KINDS``.
        needs_finetune: True when quality needs a fine-tuning recipe first (the demo skips these).
        paper: the paper (title, venue, arXiv id) it implements.
        patterns: attention patterns it supports (``PATTERNS``); others raise a clear error.
        make_state: optional ``make_state(module, config, layer_index, role, context) -> PatchState`` for methods
            whose state is built from the module (parameters, per-layer plans).
        mask_builder: optional transformers mask-interface function; default is transformers' own SDPA mask.
        select: block-sparse methods only: ``select(geometry, query, key, state)`` -> bool block mask or ready
            block lists (``methods._sparse.BlockSelector``); None for every other method.
        static: block-sparse methods only: True when ``select`` depends on positions only (cached per shape).
        state_cls: the method's typed per-module state (a ``MethodState`` dataclass), held by ``PatchState`` as
            ``method_state``; None when the method keeps nothing between calls.
        key_bounds: the method takes a compiled decode step's rows as ``key_bounds=`` (``methods._rows.KeyBounds``:
            the keys are a static cache's whole capacity, each row's real keys a device-side ``[start, end)``), so
            the step needs no host read; other methods get the keys cut on the host (a graph break when compiled).
        install: optional ``install(model, patch) -> list of handles`` for methods that need more of the model than
            its attention calls (a vision tower's attention maps, a forward hook on the whole model): called by the
            adapter once every state is attached, with the model the adapter patched and its patch record
            (``.context``, ``.family``, ``.modules``); each returned handle's ``remove()`` runs at ``unpatch``.
    """

    name: str
    config_cls: type[MethodConfig]
    forward: Callable
    category: str
    families: tuple[str, ...]
    needs_finetune: bool
    paper: str
    patterns: tuple[str, ...] = PATTERNS
    make_state: Callable | None = None
    mask_builder: Callable | None = None
    summary: str = field(default="")
    select: Callable | None = None
    static: bool = False
    state_cls: type | None = None
    key_bounds: bool = False
    install: Callable | None = None

    @property
    def hf_name(self) -> str:
        return HF_PREFIX + self.name

    @property
    def training_free(self) -> bool:
        return not self.needs_finetune


_METHODS: dict[str, MethodSpec] = {}
_listeners: list[Callable[[MethodSpec], None]] = []


def register_method(
    name: str,
    *,
    config: type[MethodConfig],
    category: str,
    families: tuple[str, ...] | str = FAMILY_KINDS,
    needs_finetune: bool = False,
    paper: str,
    patterns: tuple[str, ...] = PATTERNS,
    make_state: Callable | None = None,
    mask_builder: Callable | None = None,
    select: Callable | None = None,
    static: bool = False,
    state_cls: type | None = None,
    key_bounds: bool = False,
    install: Callable | None = None,
):
    """Decorator registering an attention function as method ``name`` (see ``MethodSpec`` for the arguments)."""

    def decorate(forward: Callable) -> Callable:
        spec = MethodSpec(
            name=name,
            config_cls=config,
            forward=forward,
            category=category,
            families=(families,) if isinstance(families, str) else tuple(families),
            needs_finetune=needs_finetune,
            paper=paper,
            patterns=tuple(patterns),
            make_state=make_state,
            mask_builder=mask_builder,
            summary=(forward.__doc__ or "").strip().splitlines()[0] if forward.__doc__ else "",
            select=select,
            static=static,
            state_cls=state_cls,
            key_bounds=key_bounds,
            install=install,
        )
        _validate_spec(spec)
        config.method = name
        _METHODS[name] = spec
        for listener in _listeners:
            listener(spec)
        return forward

    return decorate


def _validate_spec(spec: MethodSpec) -> None:
    if not spec.name or not all(c.islower() or c.isdigit() or c == "_" for c in spec.name):
        raise ValueError(f"method name {spec.name!r} must be lower-case letters, digits and '_'")
    if spec.name in _METHODS and _METHODS[spec.name].forward is not spec.forward:
        raise ValueError(f"method {spec.name!r} is already registered")
    if spec.category not in CATEGORIES:
        raise ValueError(f"category {spec.category!r} of {spec.name!r} must be one of {CATEGORIES}")
    unknown = set(spec.families) - set(FAMILY_KINDS)
    if unknown:
        raise ValueError(f"families {sorted(unknown)} of {spec.name!r} must be among {FAMILY_KINDS}")
    bad = set(spec.patterns) - set(PATTERNS)
    if bad:
        raise ValueError(f"patterns {sorted(bad)} of {spec.name!r} must be among {PATTERNS}")
    if not issubclass(spec.config_cls, MethodConfig):
        raise TypeError(f"config of {spec.name!r} must subclass MethodConfig")
    if spec.static and spec.select is None:
        raise ValueError(f"method {spec.name!r}: static=True needs a block selector (select=)")


def on_register(listener: Callable[[MethodSpec], None]) -> None:
    """Call ``listener(spec)`` for every method registered now and later (adapters use it to register names)."""
    _listeners.append(listener)
    for spec in list(_METHODS.values()):
        listener(spec)


def get_spec(name: str) -> MethodSpec:
    """The spec of a registered method (``"hip"`` or its transformers name ``"patchattn_hip"``); ValueError listing
    the known names and the closest match otherwise (as ``patchattn_*`` names when given one)."""
    if isinstance(name, str) and name.startswith(HF_PREFIX):
        if name[len(HF_PREFIX):] in _METHODS:
            return _METHODS[name[len(HF_PREFIX):]]
        raise ValueError(unknown_hf_name_message(name))
    if name in _METHODS:
        return _METHODS[name]
    hint = closest(str(name), _METHODS)
    suggestion = f" Did you mean {hint!r}?" if hint else ""
    raise ValueError(f"unknown attention method {name!r}.{suggestion} Known methods: {', '.join(sorted(_METHODS))}")


def hf_names() -> list[str]:
    """The ``attn_implementation`` names patchattn registers with transformers (``patchattn_<method>``)."""
    return sorted(spec.hf_name for spec in _METHODS.values())


def unknown_hf_name_message(name: str) -> str:
    """The error for an ``attn_implementation`` name that is not a registered ``patchattn_*`` name."""
    hint = closest(str(name), hf_names())
    suggestion = f" Did you mean {hint!r}?" if hint else ""
    return (f"unknown attn_implementation {name!r}: no patchattn method of that name.{suggestion} Registered "
            f"patchattn names: {', '.join(hf_names())}")


def hf_attn_implementation(name: str) -> str:
    """The transformers ``attn_implementation`` of method ``name`` (``"hip"`` or ``"patchattn_hip"``), checked.

    transformers checks ``attn_implementation`` against its registry before any patchattn code runs and its error
    lists only its own implementations, so ``from_pretrained(..., attn_implementation=hf_attn_implementation("hipp"))``
    is the way to get an error that lists the ``patchattn_*`` names (and the closest one) for a typo."""
    if isinstance(name, str) and name.startswith(HF_PREFIX):
        return get_spec(name).hf_name
    if isinstance(name, str) and name in _METHODS:
        return _METHODS[name].hf_name
    raise ValueError(unknown_hf_name_message(name if str(name).startswith(HF_PREFIX) else HF_PREFIX + str(name)))


def find_spec(name: str) -> MethodSpec | None:
    """The spec of a registered method, or None (no error: for callers that handle unregistered names)."""
    return _METHODS.get(name)


def spec_for_config(config: MethodConfig) -> MethodSpec:
    return get_spec(type(config).method)


def all_specs() -> list[MethodSpec]:
    return [_METHODS[n] for n in sorted(_METHODS, key=lambda n: (CATEGORIES.index(_METHODS[n].category), n))]
