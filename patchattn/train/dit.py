"""DiT distillation: a patched diffusers transformer with LoRA learns to match its own dense attention.

Student: the transformer with the recipe's patch (``patch.json``: any DiT method, e.g. ``clear`` or ``gna``) and a
peft LoRA on its attention projections (``lora.json``), plus the patch's own parameters (names containing
``.patchattn.``), trained.  Teacher: the *same* transformer with the adapter disabled (``disable_adapter``) and
the patch suspended (``api.unpatched``): the model's own dense attention and base weights, no second copy.
Loss: MSE between student and teacher transformer outputs on synthetic inputs (``dit_inputs``: random latents on
the grid, random text embeddings, random timesteps), so a run needs nothing but the transformer.

A run writes what an LLM run writes (``artifacts``): ``adapter/`` (peft, safetensors), ``patch.json``,
``patch_state.safetensors``, ``recipe.json``, ``log.jsonl``, ``loss.png``, ``metrics.json`` -- the last with the
output *drift* from the dense teacher (``eval/drift.py``: cosine, PSNR, MSE) on held-out synthetic batches before
and after tuning.  ``patchattn.load(None, adapter=<output>)`` rebuilds the tuned transformer.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm

from .. import api
from ..adapters.diffusers import family_of
from ..dit_models import TINY_DITS, is_tiny_dit, load_dit_base, tiny_dit_names
from ..eval.drift import DRIFT_NOTE, drift
from ..models import TINY_PREFIX, UnknownModelError
from . import artifacts, checkpoint
from .dit_inputs import check_grid, default_text_length, synthetic_inputs, to_device
from .model import inner_model, patch_parameters, trainable_parameters
from .recipe import DiTDistillConfig, Recipe, RecipeError

TRAIN_STREAM, HELDOUT_STREAM = 1, 2  # batches of the two streams never coincide


# ----------------------------------------------------------------------------------------------------------------
# Inputs and outputs
# ----------------------------------------------------------------------------------------------------------------
def batch_seed(seed: int, stream: int, index: int) -> int:
    """The generator seed of batch ``index`` of a stream: a pure function, so a resumed run reads the same."""
    return (stream << 60) + (seed << 32) + index


def shapes_of(transformer, config: DiTDistillConfig) -> tuple[tuple[int, int, int], int]:
    """(grid, n_text) of the run: the recipe's, else the tiny model's own."""
    tiny = TINY_DITS[config.model[len(TINY_PREFIX):]] if is_tiny_dit(config.model) else None
    grid = config.grid or (tiny.grid if tiny else None)
    if grid is None:
        raise RecipeError("train.json: grid ([frames, height, width] in latent tokens) is needed for a model that "
                          "is not a tiny one, e.g. [1, 64, 64] for FLUX at 1024x1024")
    family = family_of(transformer).name
    try:
        n_text = default_text_length(transformer, config.n_text or (None if tiny is None else tiny.n_text))
        return check_grid(family, grid), n_text
    except ValueError as err:
        raise RecipeError(f"train.json: {err}") from None


def make_batch(transformer, config: DiTDistillConfig, shapes, stream: int, index: int, device) -> dict:
    generator = torch.Generator().manual_seed(batch_seed(config.seed, stream, index))
    grid, n_text = shapes
    dtype = getattr(torch, config.dtype)
    inputs = synthetic_inputs(transformer, grid, n_text, config.batch, generator, tuple(config.timestep_range), dtype)
    return to_device(inputs, device)


def output_of(model, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    return out.sample if hasattr(out, "sample") else out[0]


def teacher_output(model, inputs: dict) -> torch.Tensor:
    """The dense teacher: the same model with its LoRA adapter disabled and its attention patch suspended."""
    disable = model.disable_adapter() if callable(getattr(model, "disable_adapter", None)) else contextlib.nullcontext()
    with torch.no_grad(), disable, api.unpatched(model):
        return output_of(model, inputs)


def student_output(model, inputs: dict) -> torch.Tensor:
    return output_of(model, inputs)


def measure_drift(student, teacher_model, batches) -> dict:
    """Output drift (cosine, PSNR, MSE) of ``student`` from the dense teacher, in eval mode."""
    student.eval()
    return drift(lambda x: student_output(student, x), lambda x: teacher_output(teacher_model, x), batches)


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------
def load_student_base(config: DiTDistillConfig):
    if config.model is None:
        raise RecipeError("this DiT recipe names no model: give one with --model (a local diffusers folder, e.g. "
                          f"FLUX.1-dev's pipeline folder, or {', '.join(tiny_dit_names())} for a smoke run)")
    try:
        return load_dit_base(config.model, config.dtype)
    except UnknownModelError as err:
        raise RecipeError(str(err)) from None


def wrap_dit_lora(transformer, lora: dict):
    """peft LoRA around the transformer (no task type); the patch's own parameters are made trainable too."""
    peft_model = get_peft_model(transformer, LoraConfig(**lora))
    for param in patch_parameters(transformer).values():
        param.requires_grad_(True)
    return peft_model


def distill(recipe: Recipe, options=None):
    """Run a DiT distillation recipe; returns (metrics, the tuned peft model with its inference patch, or None if
    stopped early).  Metrics are also written to ``<output>/metrics.json``."""
    from .run import JsonlLog, RunOptions, lr_lambda, output_dir_of

    options = options or RunOptions()
    config = recipe.train
    output = output_dir_of(recipe)
    os.makedirs(output, exist_ok=True)
    torch.manual_seed(config.seed)
    started = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    transformer = load_student_base(config).to(device)
    transformer.requires_grad_(False)
    shapes = shapes_of(transformer, config)
    heldout = [make_batch(transformer, config, shapes, HELDOUT_STREAM, i, device) for i in range(config.eval_batches)]

    resume_from = checkpoint.latest_checkpoint(output) if options.resume else None
    baseline_path = os.path.join(output, "baseline.json")
    if not (options.evaluate and heldout):
        before = None
    elif resume_from and os.path.exists(baseline_path):
        before = artifacts.read_json(baseline_path)
    else:
        before = _drift_before(transformer, recipe, heldout)
        artifacts.write_json(baseline_path, before)

    torch.manual_seed(config.seed)  # the patch's own initialisation must not depend on the baseline pass
    api.apply_patch(transformer, recipe.patch)
    peft_model = wrap_dit_lora(transformer, recipe.lora)
    named = trainable_parameters(peft_model)
    optimizer = torch.optim.AdamW([p for _, p in named], lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    start = checkpoint.load_checkpoint(resume_from, named, optimizer, scheduler) if resume_from else 0
    log = JsonlLog(os.path.join(output, "log.jsonl"), start if resume_from else None)
    stop = min(config.steps, options.stop_after or config.steps)
    bar = tqdm(total=config.steps, initial=start, disable=not options.progress, desc="distill", unit="step",
               dynamic_ncols=True)
    for step in range(start, stop):
        row = _train_step(peft_model, optimizer, scheduler, config, shapes, step, named, device)
        log.write(step=step + 1, **row, elapsed_s=round(time.time() - started, 2))
        bar.update(1)
        bar.set_postfix(loss=f"{row['distill_loss']:.4g}", lr=f"{row['lr']:.2e}")
        done = step + 1
        if (config.save_every and done % config.save_every == 0) or done == stop:
            checkpoint.save_checkpoint(checkpoint.checkpoint_dir(output, done), done, named, optimizer, scheduler)
    bar.close()
    if stop < config.steps:
        return {"stopped_at": stop}, None
    return _finish(peft_model, recipe, output, heldout, before, shapes, started, start), peft_model


def _drift_before(transformer, recipe: Recipe, heldout) -> dict:
    """Drift of the untuned student (base weights + inference patch) from the dense teacher."""
    if recipe.inference["method"] == "dense":
        return measure_drift(transformer, transformer, heldout)
    api.apply_patch(transformer, recipe.inference)
    try:
        return measure_drift(transformer, transformer, heldout)
    finally:
        api.unpatch(transformer)


def _train_step(model, optimizer, scheduler, config, shapes, step, named, device) -> dict:
    model.train()
    total = 0.0
    base = inner_model(model)
    for micro in range(config.grad_accum):
        inputs = make_batch(base, config, shapes, TRAIN_STREAM, step * config.grad_accum + micro, device)
        target = teacher_output(model, inputs).float()
        loss = torch.nn.functional.mse_loss(student_output(model, inputs).float(), target)
        (loss / config.grad_accum).backward()
        total += float(loss.detach()) / config.grad_accum
    grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in named], config.max_grad_norm)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": total, "distill_loss": total, "lr": lr, "grad_norm": float(grad_norm)}


def _finish(peft_model, recipe, output, heldout, before, shapes, started, resumed_at) -> dict:
    config = recipe.train
    artifacts.save_artifacts(output, peft_model, recipe)
    # "after": the inference patch applied the way patchattn.load(adapter=...) applies it
    base = inner_model(peft_model)
    if api.get_handle(base) is not None:
        api.unpatch(base)
    artifacts.apply_inference_patch(base, output)
    peft_model.eval()
    grid, n_text = shapes
    metrics = {
        "recipe": recipe.name, "kind": config.kind, "model": config.model, "steps": config.steps,
        "grid": list(grid), "n_text": n_text, "batch": config.batch, "grad_accum": config.grad_accum,
        "inference_patch": recipe.inference, "training_patch": recipe.patch,
        "resumed_at_step": resumed_at or None,
    }
    if before is not None:
        metrics.update(drift_note=DRIFT_NOTE, heldout_batches=len(heldout), drift_before=before,
                       drift_after=measure_drift(peft_model, peft_model, heldout))
    else:
        metrics["evaluated"] = False
    metrics["wall_time_s"] = round(time.time() - started, 1)
    artifacts.write_json(os.path.join(output, "metrics.json"), metrics)
    artifacts.plot_loss(os.path.join(output, "log.jsonl"), os.path.join(output, "loss.png"),
                        f"{recipe.name}: {config.model}, grid {list(grid)}, {config.steps} steps",
                        loss_key="distill_loss", ylabel="MSE to the dense teacher's output")
    return metrics
