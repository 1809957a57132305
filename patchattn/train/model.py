"""Building the model a recipe trains: base weights, the attention patch, LoRA, and which parameters learn."""

from __future__ import annotations

import torch

from .. import api
from ..models import EMBEDDED, TINY_CONFIGS
from .data import ByteTokenizer
from .recipe import RecipeError

PATCH_PARAM_MARK = ".patchattn."  # every learned patch parameter (MoH routers, gates) has this in its name
TINY_PREFIX = "tiny-"


def load_base(name: str, dtype: str = "float32"):
    """(model, tokenizer) in eval mode: an embedded model, ``tiny-<family>`` (random, byte tokenizer) or a path."""
    import os

    torch_dtype = getattr(torch, dtype)
    if name.startswith(TINY_PREFIX):
        from ..models import tiny_model

        family = name[len(TINY_PREFIX):]
        if family not in TINY_CONFIGS:
            raise RecipeError(f"unknown model {name!r}; tiny models: "
                              f"{', '.join(TINY_PREFIX + f for f in TINY_CONFIGS)}")
        model = tiny_model(family).to(torch_dtype)
        return model, ByteTokenizer(model.config.vocab_size)
    if name not in EMBEDDED and not os.path.exists(name):
        from ..config import closest

        known = [*EMBEDDED, *(TINY_PREFIX + f for f in TINY_CONFIGS)]
        hint = closest(name, known)
        raise RecipeError(f"unknown model {name!r}{f'; did you mean {hint!r}?' if hint else ''} Use one of "
                          f"{', '.join(known)} or a local model folder (no hub downloads)")
    from ..models import load_pretrained

    return load_pretrained(name, dtype=torch_dtype)


def apply_patch(model, patch: dict):
    """``patchattn.patch`` with a recipe's patch entry (``{"method": ..., fields}``)."""
    fields = {k: v for k, v in patch.items() if k != "method"}
    return api.patch(model, patch["method"], **fields)


def patch_parameters(model) -> dict[str, torch.nn.Parameter]:
    """Learned patch-state parameters by name (relative to ``model``)."""
    return {name: p for name, p in model.named_parameters() if PATCH_PARAM_MARK in name}


def wrap_lora(model, lora: dict):
    """peft LoRA around ``model``; patch-state parameters are made trainable too (peft freezes them)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(**{"task_type": "CAUSAL_LM", **lora})
    peft_model = get_peft_model(model, config)
    for param in patch_parameters(model).values():
        param.requires_grad_(True)
    return peft_model


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def inner_model(peft_model):
    """The transformers model inside a peft wrapper (parameter names as in the base checkpoint)."""
    return peft_model.get_base_model()
