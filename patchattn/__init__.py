"""patchattn: swap the attention of pretrained transformers and diffusers models for sparse, sink-calibrated,
head-modulated and mixture-of-heads variants, in one line.

    import patchattn
    model, tok = patchattn.load("smollm2")
    patchattn.patch(model, "dense")

The public names load on first use (``import patchattn`` itself imports neither torch nor transformers, so the
command line starts at once); the methods are registered with transformers as soon as its model code loads.
"""

from __future__ import annotations

import importlib

from ._startup import register_methods, register_with_transformers_when_it_loads

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first access)
_PUBLIC = {
    "MethodConfig": "config",
    "MethodSpec": "registry",
    "register_method": "registry",
    "MethodState": "state",
    "PatchContext": "state",
    "PatchState": "state",
    "TokenLayout": "state",
    "SparseConfig": "methods._sparse",
    "register_sparse_method": "methods._sparse",
    "BoundedCache": "adapters.kv_cache",
    "bounded_cache": "adapters.kv_cache",
    **{name: "api" for name in ("PatchHandle", "get_config", "get_handle", "list_methods", "load", "load_dit",
                                "patch", "patched", "repatch_from_config", "set_denoising_steps", "unpatch")},
}

__all__ = [
    "BoundedCache", "MethodConfig", "MethodSpec", "MethodState", "PatchContext", "PatchHandle", "PatchState",
    "SparseConfig", "TokenLayout", "bounded_cache", "get_config", "get_handle", "list_methods", "load", "load_dit", "patch", "patched",
    "register_method", "register_sparse_method", "repatch_from_config", "set_denoising_steps", "unpatch",
]


def __getattr__(name: str):
    if name in _PUBLIC:
        register_methods()  # a public name is used: every built-in method must be known
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    elif name.startswith("__"):
        raise AttributeError(name)
    else:
        try:  # patchattn.methods, patchattn.eval ...: submodules stay reachable as attributes
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


register_with_transformers_when_it_loads()
