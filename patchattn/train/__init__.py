"""Fine-tuning recipes: ``patchattn train <name or folder>`` (see docs/training.md; shipped: patchattn/recipes/).

A recipe is a folder of JSON files (patch, LoRA, training config); :func:`train` runs one with accelerate + peft
and saves a LoRA adapter plus the patch state, which ``patchattn.load(base, adapter=<output>)`` loads back.
A DiT recipe (``"kind": "dit_distill"`` in train.json, e.g. ``clear``) distils a patched diffusers transformer from
its own dense attention on synthetic inputs instead (``train/dit.py``).
"""

from .artifacts import load_tuned
from .cli import main
from .recipe import Recipe, RecipeError, TrainConfig, load_recipe
from .run import RunOptions, train, train_model

__all__ = ["Recipe", "RecipeError", "RunOptions", "TrainConfig", "load_recipe", "load_tuned", "main", "train", "train_model"]
