"""Method configs: validated dataclasses that round-trip through plain JSON.

Every method declares a ``MethodConfig`` subclass.  Fields carry their help text and, where it matters, their
allowed range in ``metadata``; validation happens in ``__post_init__`` so a bad value fails at construction, with a
message that says what is allowed.  ``from_dict`` refuses unknown fields by name (and suggests the closest one),
so a typo in a calibration file or a CLI flag never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

BACKENDS = ("auto", "triton", "torch")


class UnknownFieldError(TypeError, ValueError):
    """A config was given a field it does not have (caught as TypeError like a bad keyword, or as ValueError)."""


def closest(name: str, candidates) -> str | None:
    """The candidate nearest to ``name`` (for 'did you mean' messages), or None."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return matches[0] if matches else None


# Ceiling of every integer field without its own ``max``: token and block counts reach the kernels as int32.
MAX_INT = 2**31 - 1
# What an ``index=`` field's numbers index in the model, and the model dimension that bounds them.
INDEX_KINDS = {"layer": "num_layers", "head": "num_heads"}


def option(default, help: str, *, min=None, max=None, choices=None, index=None):
    """A config field with help text and an optional allowed range or set of choices.

    ``index="layer"`` / ``"head"`` marks a field whose numbers are layer / head indices of the patched model:
    ``MethodConfig.check_model`` refuses the ones the model does not have.
    """
    if index is not None and index not in INDEX_KINDS:
        raise ValueError(f"option index must be one of {list(INDEX_KINDS)}, got {index!r}")
    meta = {"help": help, "min": min, "max": max, "choices": choices, "index": index}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _type_ok(value, annotation) -> bool:
    """Loose runtime check of a value against a (string or real) annotation of a config field."""
    if annotation is Any or annotation is typing.Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is bool:
        return isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


@dataclass(kw_only=True)
class MethodConfig:
    """Base of every method config.

    Attributes:
        backend (str): ``"auto"`` runs Triton where it can (CUDA, or ``TRITON_INTERPRET=1``) and the pure-torch
            reference elsewhere; ``"triton"`` insists on Triton; ``"torch"`` always runs the reference.
    """

    method: ClassVar[str] = ""
    # Overrides under which the method must reproduce ``dense`` exactly (tested for every method).
    DENSE_EQUIVALENT: ClassVar[dict] = {}

    backend: str = option("auto", "kernel backend", choices=BACKENDS)

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            self._check_field(f, hints.get(f.name, Any), getattr(self, f.name))
        self.validate()

    def where(self, name: str) -> str:
        """How errors name field ``name``: the method and the config class (``moa: MoAConfig.density``)."""
        prefix = f"{self.method}: " if self.method else ""
        return f"{prefix}{type(self).__name__}.{name}"

    def _check_field(self, f: dataclasses.Field, annotation, value) -> None:
        where = self.where(f.name)
        if not _type_ok(value, annotation):
            raise ValueError(f"{where} must be of type {_describe(annotation)}, got {value!r} ({type(value).__name__})")
        meta = f.metadata
        if meta.get("choices") is not None and value not in meta["choices"]:
            raise ValueError(f"{where} must be one of {list(meta['choices'])}, got {value!r}")
        numbers = value if isinstance(value, (list, tuple)) else [value]
        kind = meta.get("index")
        if kind is not None and any(isinstance(v, bool) or not isinstance(v, int) for v in numbers if v is not None):
            raise ValueError(f"{where} must hold {kind} indices (integers >= 0), got {value!r}")
        for v in numbers:
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            # NaN compares False with every bound, so it must be refused before the range check lets it through.
            if not math.isfinite(v):
                raise ValueError(f"{where} must be a finite number{_allowed_range(meta)}, got {value!r}")
            low, high = meta.get("min"), meta.get("max")
            if high is None and isinstance(v, int):
                high = MAX_INT
            if (low is not None and v < low) or (high is not None and v > high):
                bound = f">= {low}" if low is not None and v < low else f"<= {high}"
                both = f" (allowed: [{low}, {high}])" if low is not None and meta.get("max") is not None else ""
                raise ValueError(f"{where} must be {bound}{both}, got {value!r}")

    def validate(self) -> None:
        """Cross-field checks; subclasses override and raise ValueError with what is allowed."""

    def check_model(self, *, num_layers: int | None = None, num_heads: int | None = None) -> None:
        """ValueError for layer / head indices the model does not have (None: that dimension is unknown, unchecked).

        Covers every field declared with ``option(..., index="layer" | "head")``; subclasses with indices inside
        structured fields (dicts of layers, plan files) extend it.
        """
        dims = {"num_layers": num_layers, "num_heads": num_heads}
        for f in dataclasses.fields(self):
            kind = f.metadata.get("index")
            if kind is None:
                continue
            value = getattr(self, f.name)
            indices = value if isinstance(value, (list, tuple)) else [] if value is None else [value]
            check_indices(self.where(f.name), indices, kind, dims[INDEX_KINDS[kind]])

    # -- serialisation -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain JSON-ready dict, including the method name so a file says what it configures."""
        data = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"method": self.method, **data}

    @classmethod
    def from_dict(cls, data: dict) -> MethodConfig:
        data = dict(data)
        named = data.pop("method", cls.method)
        if named != cls.method:
            raise ValueError(f"config is for method {named!r}, not {cls.method!r}")
        cls.check_fields(data)
        return cls(**data)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def check_fields(cls, overrides: dict) -> None:
        """Raise UnknownFieldError naming any field this config does not have (with the closest valid name)."""
        known = cls.field_names()
        for name in overrides:
            if name not in known:
                hint = closest(name, known)
                suggestion = f"; did you mean {hint!r}?" if hint else ""
                raise UnknownFieldError(
                    f"{cls.__name__} has no field {name!r}{suggestion} Valid fields: {', '.join(known)}"
                )

    def replace(self, **overrides) -> MethodConfig:
        self.check_fields(overrides)
        return dataclasses.replace(self, **overrides)

    @classmethod
    def describe_fields(cls) -> list[tuple[str, Any, str]]:
        """(name, default, help) for each field, for docs and ``patchattn list --fields``."""
        rows = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f.name, default, f.metadata.get("help", "")))
        return rows


def check_indices(where: str, indices, kind: str, count: int | None) -> None:
    """ValueError naming ``where``, the first index the model lacks and the model's range (``count`` of ``kind``)."""
    if count is None:
        return
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < count:
            raise ValueError(f"{where}: {kind} index {i!r} does not exist in this model, which has {count} "
                             f"{kind}s (allowed: {kind} indices in [0, {count - 1}])")


def model_dims(model, targets: str = "text") -> dict:
    """``{"num_layers", "num_heads"}`` of the part of ``model`` that ``targets`` patches; None where not known.

    Read from a transformers config by its standard names (``get_text_config()`` for the language model of an
    LVLM, ``vision_config`` for its tower); ``"all"`` takes the larger of the two, since an index there may name a
    layer of either.  Other models (diffusers DiTs) report None: their modules are counted only when patched.
    """
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(config, "get_text_config", None)):
        return {"num_layers": None, "num_heads": None}
    text = config.get_text_config()
    vision = getattr(config, "vision_config", None)
    parts = {"text": [text], "vision": [vision], "all": [text, vision]}.get(targets, [text])
    dims = {}
    for name, attrs in (("num_layers", ("num_hidden_layers", "depth")), ("num_heads", ("num_attention_heads", "num_heads"))):
        found = [_first_int(part, attrs) for part in parts if part is not None]
        dims[name] = max(found) if found and None not in found else None
    return dims


def check_model_fit(config: MethodConfig, model, targets: str = "text") -> None:
    """Before patching: ValueError for indices in ``config`` that ``model`` does not have (``check_model``)."""
    config.check_model(**model_dims(model, targets))


def _first_int(config, names) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _allowed_range(meta) -> str:
    """The field's allowed range as words (' in [0.0, 1.0]', ' >= 1', ''), for error messages."""
    low, high = meta.get("min"), meta.get("max")
    if low is not None and high is not None:
        return f" in [{low}, {high}]"
    if low is not None:
        return f" >= {low}"
    return f" <= {high}" if high is not None else ""


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _describe(annotation) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


READS_EVERYTHING = 0.999  # a density at or above this: every causally allowed block was read


def _field_tokens(name: str, value, block_size: int | None) -> int | None:
    """How many tokens an integer config field spans: ``*_blocks`` and ``top_k`` count blocks, ``*len*``,
    ``window`` and ``*_tokens`` count tokens; other fields (strides, seeds, sample sizes) span nothing."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    if (name.endswith("_blocks") or name == "top_k") and block_size:
        return value * block_size
    if "len" in name or "window" in name or name.endswith("_tokens"):
        return value
    return None


def covering_fields(config, tokens: int) -> list[tuple[str, int]]:
    """The config fields that reach the whole input at ``tokens`` tokens: (``name=value: help``, tokens spanned).
    Why a sparse method reads every block at that length: the demo, eval and the methods' warning name them."""
    block_size = getattr(config, "block_size", None)
    out = []
    for name, value, help_text in config.describe_fields():
        value = getattr(config, name, value)
        span = _field_tokens(name, value, block_size)
        if span is not None and span >= tokens:
            shown = f"{name}={value}" + (f" = {span} tokens" if span != value else "")
            out.append((f"{shown}: {help_text}", span))
    return out
