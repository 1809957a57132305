"""Method configs: validated dataclasses that round-trip through plain JSON.

Every method declares a ``MethodConfig`` subclass.  Fields carry their help text and, where it matters, their
allowed range in ``metadata``; validation happens in ``__post_init__`` so a bad value fails at construction, with a
message that says what is allowed.  ``from_dict`` refuses unknown fields by name (and suggests the closest one),
so a typo in a calibration file or a CLI flag never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
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


def option(default, help: str, *, min=None, max=None, choices=None):
    """A config field with help text and an optional allowed range or set of choices."""
    meta = {"help": help, "min": min, "max": max, "choices": choices}
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

    def _check_field(self, f: dataclasses.Field, annotation, value) -> None:
        where = f"{type(self).__name__}.{f.name}"
        if not _type_ok(value, annotation):
            raise ValueError(f"{where} must be of type {_describe(annotation)}, got {value!r} ({type(value).__name__})")
        meta = f.metadata
        if meta.get("choices") is not None and value not in meta["choices"]:
            raise ValueError(f"{where} must be one of {list(meta['choices'])}, got {value!r}")
        numbers = value if isinstance(value, (list, tuple)) else [value]
        for v in numbers:
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            if meta.get("min") is not None and v < meta["min"]:
                raise ValueError(f"{where} must be >= {meta['min']}, got {value!r}")
            if meta.get("max") is not None and v > meta["max"]:
                raise ValueError(f"{where} must be <= {meta['max']}, got {value!r}")

    def validate(self) -> None:
        """Cross-field checks; subclasses override and raise ValueError with what is allowed."""

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
