"""patchattn: swap the attention of pretrained transformers and diffusers models for sparse, sink-calibrated,
head-modulated and mixture-of-heads variants, in one line.

    import patchattn
    model, tok = patchattn.load("smollm2")
    patchattn.patch(model, "dense")
"""

from . import methods
from .adapters import hf as _hf
from .api import (PatchHandle, get_config, get_handle, list_methods, load, load_dit, patch, patched,
                  repatch_from_config, unpatch)
from .config import MethodConfig
from .methods._sparse import SparseConfig, register_sparse_method
from .registry import MethodSpec, register_method
from .state import MethodState, PatchContext, PatchState, TokenLayout

__version__ = "0.1.0"

__all__ = [
    "MethodConfig",
    "MethodSpec",
    "MethodState",
    "PatchContext",
    "PatchHandle",
    "PatchState",
    "SparseConfig",
    "TokenLayout",
    "get_config",
    "get_handle",
    "list_methods",
    "load",
    "load_dit",
    "patch",
    "patched",
    "register_method",
    "register_sparse_method",
    "repatch_from_config",
    "unpatch",
]
