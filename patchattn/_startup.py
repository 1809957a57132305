"""Keep ``import patchattn`` cheap while its methods stay registered with transformers.

Importing the methods costs seconds (torch, transformers' model code), which every command line call would pay,
even ``patchattn --help``.  The package therefore loads them on first use of a public name, and -- so that a model
saved while patched, or ``attn_implementation="patchattn_<name>"``, still loads after a bare ``import patchattn``
-- as soon as transformers loads its model code (``transformers.modeling_utils``), which every ``from_pretrained``
and model constructor goes through before it looks up an attention implementation.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

TRIGGER = "transformers.modeling_utils"


def register_methods() -> None:
    """Import the built-in methods and the transformers adapter (which registers every method's name)."""
    from . import methods  # noqa: F401  (importing a method file registers it)
    from .adapters import hf  # noqa: F401  (registers every method with transformers' attention registries)


def _register_after_transformers() -> None:
    try:
        register_methods()
    # Never break the user's transformers import over this; say instead why the patchattn_* names are missing.
    except Exception as err:  # noqa: BLE001
        warnings.warn(f"patchattn could not register its methods with transformers: {type(err).__name__}: {err}",
                      stacklevel=2)


class _LoaderThenRegister(importlib.abc.Loader):
    """The real loader of ``transformers.modeling_utils``, then the registration once the module has run."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _register_after_transformers()

    def __getattr__(self, name):  # get_source, get_filename, is_package ... of the real loader
        return getattr(self._loader, name)


class _RegisterWhenTransformersLoads(importlib.abc.MetaPathFinder):
    """One-shot import hook: wraps the loader of ``TRIGGER``, then removes itself."""

    def find_spec(self, name, path, target=None):
        if name != TRIGGER:
            return None
        sys.meta_path.remove(self)  # before looking it up, so the search below does not come back here
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _LoaderThenRegister(spec.loader)
        return spec


def register_with_transformers_when_it_loads() -> None:
    """Register now if transformers' model code is already imported, else right after it is."""
    if TRIGGER in sys.modules:
        register_methods()
    elif not any(isinstance(f, _RegisterWhenTransformersLoads) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterWhenTransformersLoads())
