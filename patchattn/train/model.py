"""Building the model a recipe trains: base weights, the attention patch, LoRA, and which parameters learn."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from .. import models
from ..api import apply_patch, patch_parameters
from ..models import TINY_PREFIX, ByteTokenizer
from .recipe import RecipeError

__all__ = ["TINY_PREFIX", "ByteTokenizer", "apply_patch", "inner_model", "load_base", "patch_parameters",
           "trainable_parameters", "wrap_lora"]


def load_base(name: str, dtype: str = "float32"):
    """``models.load_base`` with an unknown name reported as a recipe error."""
    try:
        return models.load_base(name, dtype)
    except models.UnknownModelError as err:
        raise RecipeError(str(err)) from None


def wrap_lora(model, lora: dict):
    """peft LoRA around ``model``; patch-state parameters are made trainable too (peft freezes them)."""
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
