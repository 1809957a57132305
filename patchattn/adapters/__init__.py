"""Adapters route a model family's attention calls to a method.

Each adapter module offers ``supports(model) -> bool``, ``apply(model, spec, config, targets) -> record`` and
``remove(model, record)``; an adapter may also offer ``loaded_patch(model) -> (spec, config, targets) | None`` for a
model that runs a method through its config alone (loaded from a folder saved while patched), so ``patchattn``
can give it a handle.  ``select_adapter`` picks the first that supports the model.
"""

from __future__ import annotations

import importlib
import threading

from .families import supported_hf_families

# Held while a model's patch changes (patch, unpatch, a state created lazily at a call): patching the same model from
# two threads must not interleave adding and removing states.  Re-entrant: ``patch`` unpatches first.
PATCH_LOCK = threading.RLock()

# Tried in order; diffusers is optional (the 'dit' extra) and imported only when asked about a model.
_ADAPTERS = ("hf", "diffusers")


def adapter_module(name: str):
    """The adapter module called ``name`` (``"hf"``, ``"diffusers"``)."""
    return importlib.import_module(f"{__name__}.{name}")


def select_adapter(model):
    for name in _ADAPTERS:
        try:
            adapter = adapter_module(name)
        except ImportError:
            continue
        if adapter.supports(model):
            return adapter
    raise TypeError(
        f"patchattn cannot patch a {type(model).__module__}.{type(model).__name__}. Supported: transformers models of "
        f"the families {supported_hf_families()}, and diffusers DiTs (install patchattn[dit]): "
        f"{_dit_families()}"
    )


def _dit_families() -> str:
    try:
        from .dit_families import DIT_FAMILIES
    except ImportError:
        return "FLUX, SD3, Wan, CogVideoX, PixArt"
    return ", ".join(DIT_FAMILIES)
