"""A recipe: a folder of small JSON files, read and checked here.

``patch.json`` (required)   the attention patch used while training: ``{"method": ..., <config fields>}``.
``lora.json`` (required)    keyword arguments of peft's ``LoraConfig`` (``r``, ``target_modules``, ``modules_to_save``...).
``train.json`` (required)   the fields of :class:`TrainConfig` (model, data, lengths, steps, optimiser, evaluation),
                            or, with ``"kind": "dit_distill"``, of :class:`DiTDistillConfig` (a DiT distilled from
                            its own dense attention on synthetic inputs).
``inference.json``          the patch the tuned model runs at inference (default: ``patch.json``); e.g. LongLoRA
                            trains with S²-Attn and infers with ``{"method": "dense"}``.

Every unknown file, field or method is an error that names the closest valid one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft import LoraConfig

from .. import api
from ..config import closest

SHIPPED = Path(__file__).resolve().parent.parent / "recipes"  # patchattn/recipes: installed with the package
RECIPE_FILES = ("patch.json", "lora.json", "train.json", "inference.json")
REQUIRED_FILES = ("patch.json", "lora.json", "train.json")
DATA_KINDS = ("text", "files", "dataset")
SCHEDULES = ("constant", "linear", "cosine")
# Auxiliary losses a recipe may name: resolved from this allowlist only, never by importing a string from a file.
AUX_LOSSES = {"patchattn.methods.moh:aux_loss": ("patchattn.methods.moh", "aux_loss"),
              "patchattn.methods.hybrid:transfer_loss": ("patchattn.methods.hybrid", "transfer_loss")}
# What the trainer calls once when a two-stage recipe's aux-only stage ends, so that the model stops computing a loss
# nobody reads any more (hybrid: each converted layer's transfer MSE).
AUX_STAGE_ENDS = {"patchattn.methods.hybrid:transfer_loss": ("patchattn.methods.hybrid", "end_transfer")}


class RecipeError(ValueError):
    """A recipe file is missing, malformed or names something unknown."""


@dataclass
class TrainConfig:
    """What ``train.json`` may hold (every field optional; defaults are for a short CPU run).

    Attributes:
        model: ``"smollm2"`` (embedded, offline), ``"tiny-llama"`` (random, tests), or a local model path.
        data: ``{"text": "pydoc"}`` (CPython's pydoc_data, offline), ``{"files": [paths]}``, or
            ``{"dataset": name, "split": "train", "column": "text", "config": None}`` (``datasets``, needs network
            unless cached).  The last ``holdout`` fraction of the tokens is held out for perplexity.  LLaVA models
            only: ``"images": "synthetic"`` (random images, smoke runs) or ``"images": [image files]`` gives every
            training and held-out chunk one image (its tokens after the first text token; see ``train/data.py``).
        seq_len, batch, grad_accum: tokens per sample, samples per micro-batch, micro-batches per optimiser step.
        steps, lr, warmup, schedule, weight_decay, max_grad_norm: the optimiser (AdamW) and its schedule.
        eval_every, eval_chunks, eval_seq_len: held-out perplexity every n steps (0: only before and after) on
            ``eval_chunks`` chunks of ``eval_seq_len`` (default ``seq_len``) tokens.
        decode_eval: ``{"prefill": n, "tokens": m}`` also measures perplexity token by token against the KV cache
            (where eviction such as SinkLoRA's ``kv_budget`` acts); ``None`` skips it.
        save_every: checkpoint every n steps (0: only at the end).
        aux_loss, aux_weight: an extra loss from ``AUX_LOSSES`` (e.g. MoH's load balance), times ``aux_weight``.
        aux_only_steps: a first stage of n steps that minimises the aux loss alone and updates only the patch's
            own parameters (``.patchattn.`` names; LoRA stays at its initialisation, so a softmax teacher computed
            through the adapted projections is the base model's): LoLCATs' attention transfer before LoRA; the later
            steps then minimise the LM loss alone.  0 (default): one stage, LM loss + aux loss throughout.
        dtype: ``"float32"`` or ``"bfloat16"`` for the base weights (LoRA weights stay float32).
    """

    model: str = "smollm2"
    data: dict = field(default_factory=lambda: {"text": "pydoc"})
    seq_len: int = 512
    batch: int = 1
    grad_accum: int = 1
    steps: int = 100
    lr: float = 2e-4
    warmup: int = 10
    schedule: str = "constant"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    holdout: float = 0.1
    eval_every: int = 0
    eval_chunks: int = 4
    eval_seq_len: int | None = None
    decode_eval: dict | None = None
    save_every: int = 0
    seed: int = 0
    output_dir: str | None = None
    aux_loss: str | None = None
    aux_weight: float = 1.0
    aux_only_steps: int = 0
    dtype: str = "float32"

    def __post_init__(self):
        positive = ("seq_len", "batch", "grad_accum", "steps", "eval_chunks")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise RecipeError(f"train.json: {name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("warmup", "eval_every", "save_every", "seed", "aux_only_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise RecipeError(f"train.json: {name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.schedule not in SCHEDULES:
            raise RecipeError(f"train.json: schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        if not 0 < self.holdout < 1:
            raise RecipeError(f"train.json: holdout must be a fraction in (0, 1), got {self.holdout!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise RecipeError(f"train.json: dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.aux_loss is not None and self.aux_loss not in AUX_LOSSES:
            hint = closest(self.aux_loss, AUX_LOSSES)
            raise RecipeError(f"train.json: unknown aux_loss {self.aux_loss!r}"
                              f"{f'; did you mean {hint!r}?' if hint else ''} Allowed: {', '.join(AUX_LOSSES)}")
        if self.aux_only_steps and self.aux_loss is None:
            raise RecipeError("train.json: aux_only_steps needs an aux_loss (the loss of that first stage)")
        check_data(self.data)
        if self.decode_eval is not None:
            _check_keys("train.json: decode_eval", self.decode_eval, ("prefill", "tokens"), ("prefill", "tokens"))

    @property
    def eval_length(self) -> int:
        return self.eval_seq_len or self.seq_len


@dataclass
class DiTDistillConfig:
    """What ``train.json`` holds for a DiT distillation run (``"kind": "dit_distill"``; see ``train/dit.py``).

    Attributes:
        kind: ``"dit_distill"`` (what selects this config).
        model: ``"tiny-<family>"`` (random, offline: flux, sd3, cogvideox, wan, pixart, hunyuan_video, ltx_video)
            or a local diffusers folder (a transformer, or a pipeline with ``transformer/``); None: must be given
            (``--model``).
        grid: ``[frames, height, width]`` of the latent in tokens after patchify (FLUX 1024x1024: ``[1, 64, 64]``);
            None: the tiny model's own.
        n_text: text tokens per sample (None: the tiny model's own; CogVideoX: its ``max_text_seq_length``).
        timestep_range: timesteps are drawn uniformly from this fraction of the schedule.
        batch, grad_accum, steps, lr, warmup, schedule, weight_decay, max_grad_norm: as in ``TrainConfig``.
        eval_batches: held-out synthetic batches for the drift measure before and after tuning (0: none).
        save_every, seed, output_dir, dtype: as in ``TrainConfig``.
    """

    kind: str = "dit_distill"
    model: str | None = None
    grid: list | None = None
    n_text: int | None = None
    timestep_range: list = field(default_factory=lambda: [0.0, 1.0])
    batch: int = 1
    grad_accum: int = 1
    steps: int = 100
    lr: float = 1e-4
    warmup: int = 0
    schedule: str = "constant"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_batches: int = 4
    save_every: int = 0
    seed: int = 0
    output_dir: str | None = None
    dtype: str = "float32"

    def __post_init__(self):
        if self.kind != DIT_DISTILL:
            raise RecipeError(f"train.json: kind must be {DIT_DISTILL!r} for a DiT run, got {self.kind!r}")
        for name in ("batch", "grad_accum", "steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise RecipeError(f"train.json: {name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("warmup", "eval_batches", "save_every", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise RecipeError(f"train.json: {name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.n_text is not None and (not isinstance(self.n_text, int) or self.n_text < 1):
            raise RecipeError(f"train.json: n_text must be a positive integer or null, got {self.n_text!r}")
        if self.grid is not None and (not isinstance(self.grid, list) or len(self.grid) != 3
                                      or any(not isinstance(g, int) or g < 1 for g in self.grid)):
            raise RecipeError(f"train.json: grid must be [frames, height, width] (positive integers), got {self.grid!r}")
        low, high = (self.timestep_range + [None, None])[:2] if isinstance(self.timestep_range, list) else (None, None)
        if not (isinstance(self.timestep_range, list) and len(self.timestep_range) == 2
                and isinstance(low, (int, float)) and isinstance(high, (int, float)) and 0 <= low <= high <= 1):
            raise RecipeError(f"train.json: timestep_range must be [low, high] with 0 <= low <= high <= 1, "
                              f"got {self.timestep_range!r}")
        if self.schedule not in SCHEDULES:
            raise RecipeError(f"train.json: schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise RecipeError(f"train.json: dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")


DIT_DISTILL = api.DIT_DISTILL_KIND


@dataclass
class Recipe:
    """A loaded recipe: its name and folder, the patches, LoRA kwargs and training config."""

    name: str
    folder: str
    patch: dict
    inference: dict
    lora: dict
    train: TrainConfig | DiTDistillConfig
    planned_steps: int | None = None  # train.json's own steps, before command-line overrides

    def to_dict(self) -> dict:
        return {"name": self.name, "patch": self.patch, "inference": self.inference, "lora": self.lora,
                "train": dataclasses.asdict(self.train)}

    @property
    def is_dit(self) -> bool:
        return isinstance(self.train, DiTDistillConfig)


def _check_keys(where: str, data: dict, allowed, required=()) -> None:
    for key in data:
        if key not in allowed:
            hint = closest(key, allowed)
            raise RecipeError(f"{where}: unknown field {key!r}{f'; did you mean {hint!r}?' if hint else ''} "
                              f"Valid fields: {', '.join(allowed)}")
    missing = [k for k in required if k not in data]
    if missing:
        raise RecipeError(f"{where}: missing field(s) {', '.join(missing)}")


def check_data(data: Any) -> None:
    """The ``data`` entry names exactly one source: text, files or dataset."""
    if not isinstance(data, dict):
        raise RecipeError(f"train.json: data must be an object such as {{\"text\": \"pydoc\"}}, got {data!r}")
    kinds = [k for k in data if k in DATA_KINDS]
    _check_keys("train.json: data", data, (*DATA_KINDS, "split", "column", "config", "images"))
    if len(kinds) != 1:
        raise RecipeError(f"train.json: data must name exactly one of {', '.join(DATA_KINDS)}, got {sorted(data)}")
    if "files" in data and not (isinstance(data["files"], list) and data["files"]):
        raise RecipeError("train.json: data.files must be a non-empty list of text file paths")
    images = data.get("images")
    if images is not None and images != "synthetic" and not (isinstance(images, list) and images
                                                             and all(isinstance(p, str) for p in images)):
        raise RecipeError(f"train.json: data.images must be \"synthetic\" or a non-empty list of image file paths, "
                          f"got {images!r}")


def check_patch(where: str, patch: dict) -> dict:
    """A patch entry is a registered method plus valid fields of its config (checked by building it)."""
    if not isinstance(patch, dict) or "method" not in patch:
        raise RecipeError(f"{where}: must be an object with a 'method' field, got {patch!r}")
    fields = {k: v for k, v in patch.items() if k != "method"}
    try:
        api.get_config(patch["method"], **fields)
    except (ValueError, TypeError) as err:
        raise RecipeError(f"{where}: {err}") from None
    return patch


def check_lora(lora: dict) -> dict:
    allowed = [f.name for f in dataclasses.fields(LoraConfig) if f.init]
    _check_keys("lora.json", lora, allowed)
    return lora


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as err:
        raise RecipeError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: must hold a JSON object")
    return data


def shipped_recipes() -> list[str]:
    """Names of the recipes that ship inside the package (``patchattn train <name>``)."""
    return sorted(p.name for p in SHIPPED.iterdir() if (p / "train.json").is_file()) if SHIPPED.is_dir() else []


def recipe_folder(name_or_folder: str) -> str:
    """A recipe folder from a path, or from the name of a shipped recipe (also ``recipes/<name>``, the path the
    recipes had in a source checkout)."""
    if os.path.isdir(name_or_folder):
        return name_or_folder
    path = Path(name_or_folder)
    shipped = shipped_recipes()
    if path.name in shipped and (len(path.parts) == 1 or path.parent.name == "recipes"):
        return str(SHIPPED / path.name)
    hint = closest(path.name, shipped)
    raise RecipeError(f"recipe folder {name_or_folder!r} does not exist"
                      f"{f' (did you mean {hint!r}?)' if hint else ''}; give a recipe folder or the name of a "
                      f"shipped recipe: {', '.join(shipped)}")


def load_recipe(folder: str, overrides: dict | None = None) -> Recipe:
    """Read and check a recipe (a folder, or a shipped recipe's name); ``overrides`` replace ``train.json`` fields."""
    folder = recipe_folder(folder)
    names = sorted(os.listdir(folder))
    for name in names:
        if name.endswith(".json") and name not in RECIPE_FILES:
            hint = closest(name, RECIPE_FILES)
            raise RecipeError(f"{folder}: unknown recipe file {name!r}{f'; did you mean {hint!r}?' if hint else ''} "
                              f"Recipe files: {', '.join(RECIPE_FILES)}")
    missing = [n for n in REQUIRED_FILES if n not in names]
    if missing:
        raise RecipeError(f"{folder}: missing recipe file(s) {', '.join(missing)}")
    raw = {n: _read_json(os.path.join(folder, n)) for n in RECIPE_FILES if n in names}
    train_fields = {**raw["train.json"], **(overrides or {})}
    config_cls = DiTDistillConfig if "kind" in raw["train.json"] else TrainConfig
    _check_keys("train.json", train_fields, [f.name for f in dataclasses.fields(config_cls)])
    patch = check_patch("patch.json", raw["patch.json"])
    inference = check_patch("inference.json", raw.get("inference.json", patch))
    name = os.path.basename(os.path.normpath(folder))
    return Recipe(name, folder, patch, inference, check_lora(raw["lora.json"]), config_cls(**train_fields),
                  planned_steps=raw["train.json"].get("steps", config_cls.steps))


def bound_evaluations(config: TrainConfig, planned_steps: int | None, fixed: tuple[str, ...] = ()) -> str | None:
    """Scale the evaluations with a run shortened below the recipe's steps, so ``--steps`` bounds the whole run.

    A recipe sizes its held-out evaluations for its own length (SinkLoRA: 8 chunks of 2,048 tokens and 256 tokens
    decoded one by one, three times before training); a 3-step run keeps the same share: ``ceil(chunks * 3/150)``
    chunks and decode tokens.  Fields in ``fixed`` (set on the command line) are left alone.  Returns what changed.
    """
    if not planned_steps or config.steps >= planned_steps or not isinstance(config, TrainConfig):
        return None
    share = config.steps / planned_steps
    changed = []
    if "eval_chunks" not in fixed:
        chunks = max(1, math.ceil(config.eval_chunks * share))
        if chunks != config.eval_chunks:
            changed.append(f"{chunks} held-out chunk(s) instead of {config.eval_chunks}")
            config.eval_chunks = chunks
    if config.decode_eval and "decode_eval" not in fixed:
        tokens = max(1, math.ceil(config.decode_eval["tokens"] * share))
        if tokens != config.decode_eval["tokens"]:
            changed.append(f"{tokens} decoded token(s) instead of {config.decode_eval['tokens']}")
            config.decode_eval = {**config.decode_eval, "tokens": tokens}
    if not changed:
        return None
    return (f"{config.steps} of the recipe's {planned_steps} steps: evaluations scaled to match ("
            f"{', '.join(changed)}); choose with --eval-chunks / --set decode_eval=..., or skip them with --no-eval")
