"""The generic trainer: one recipe in, a LoRA adapter + patch state + metrics + loss curve out.

Steps: load the base model and data; measure held-out perplexity of the dense model and of the base model with the
inference patch ("before"); patch with the training patch, wrap in LoRA (patch-state parameters trainable too);
train with AdamW under accelerate (one process, DDP, or FSDP2 as the accelerate config says: ``parallel``), logging
every step to ``log.jsonl`` and checkpointing every ``save_every`` steps; then save the artifacts and measure
"after" with the inference patch, the same way ``patchattn.load(..., adapter=...)`` builds the model.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from .. import api, report
from . import artifacts, checkpoint, evaluate, parallel
from .data import TextData, build_data
from .model import apply_patch, inner_model, load_base, trainable_parameters, wrap_lora
from .recipe import AUX_LOSSES, AUX_STAGE_ENDS, Recipe, RecipeError, TrainConfig

DEFAULT_OUTPUT_ROOT = "runs"  # relative to the working directory; git-ignored in the repository


@dataclass
class RunOptions:
    """Command-line choices that are not part of the recipe."""

    resume: bool = False
    stop_after: int | None = None  # stop (as if interrupted) after this step; resume later with resume=True
    progress: bool = True
    evaluate: bool = True  # held-out evaluations before, during and after training (False: train and save only)


def output_dir_of(recipe: Recipe) -> str:
    return recipe.train.output_dir or os.path.join(DEFAULT_OUTPUT_ROOT, recipe.name)


def lr_lambda(config: TrainConfig):
    """Linear warm-up, then constant / linear decay / cosine decay to 0 at ``steps``."""

    def factor(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / (config.warmup + 1)
        if config.schedule == "constant":
            return 1.0
        progress = (step - config.warmup) / max(1, config.steps - config.warmup)
        if config.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def resolve_aux_loss(name: str | None, table: dict = AUX_LOSSES):
    if name is None or name not in table:
        return None
    module, attr = table[name]  # the recipe was checked against AUX_LOSSES
    return getattr(importlib.import_module(module), attr)


class JsonlLog:
    """Append-only JSONL log; on resume, lines after the checkpoint's step are dropped so the curve continues."""

    def __init__(self, path: str, resume_step: int | None):
        self.path = path
        if resume_step is None:
            open(path, "w").close()
            return
        kept = []
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                kept = [line for line in handle if json.loads(line)["step"] <= resume_step]
        with open(path, "w", encoding="utf-8") as handle:
            handle.writelines(kept)

    def write(self, **row) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


class NoLog:
    """The log of a process other than the main one (data parallel): the main process writes the run's files."""

    def write(self, **row) -> None:
        pass


def _progress(total: int, initial: int, enabled: bool):
    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)


def measure(model, data: TextData, config: TrainConfig, *, training_attention: bool = False,
            decode: bool = True, desc: str | None = None) -> dict:
    """Held-out loss/perplexity (and decode perplexity when the recipe asks) of ``model`` as it is now; ``desc``
    names the progress bars (None: no bars)."""
    model.eval()
    if training_attention:
        with evaluate.training_attention(model):
            loss = evaluate.heldout_loss(model, data.heldout, desc, data.heldout_inputs)
        return {"loss": loss, "ppl": evaluate.ppl(loss)}
    loss = evaluate.heldout_loss(model, data.heldout, desc, data.heldout_inputs)
    result = {"loss": loss, "ppl": evaluate.ppl(loss)}
    if config.decode_eval and decode:
        d = evaluate.decode_loss(model, data.heldout_stream, config.decode_eval["prefill"], config.decode_eval["tokens"],
                                 desc and f"{desc}, decode")
        result.update(decode_loss=d, decode_ppl=evaluate.ppl(d))
    return result


def baseline_metrics(model, data: TextData, recipe: Recipe, progress: bool = False) -> dict:
    """Dense base model, base + inference patch ("before"), base + training attention."""
    config = recipe.train
    label = (lambda name: f"eval {name}") if progress else (lambda name: None)
    metrics = {"dense": measure(model, data, config, desc=label("dense"))}
    if recipe.inference["method"] != "dense":
        apply_patch(model, recipe.inference)  # learned patch state (MoH router) at its initial values
    metrics["before"] = measure(model, data, config, desc=label("before (inference patch)"))
    if api.get_handle(model) is not None:
        api.unpatch(model)
    apply_patch(model, recipe.patch)
    metrics["before_training_attention"] = measure(model, data, config, training_attention=True,
                                                   desc=label("before (training attention)"))
    api.unpatch(model)
    return metrics


def train(recipe: Recipe, options: RunOptions | None = None) -> dict:
    """Run ``recipe``; returns metrics (also written to ``<output>/metrics.json``)."""
    return train_model(recipe, options)[0]


def train_model(recipe: Recipe, options: RunOptions | None = None):
    """Run ``recipe``; returns (metrics, the tuned peft model with its inference patch, or None if stopped early).

    A DiT recipe (``"kind": "dit_distill"`` in train.json) runs ``dit.distill`` instead."""
    options = options or RunOptions()
    if recipe.is_dit:
        from .dit import distill

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # it has no data-parallel path: N processes would race
            raise RecipeError("a DiT distillation recipe (kind dit_distill) trains on one process; launch it "
                              "without torchrun / accelerate launch --num_processes")
        return distill(recipe, options)
    config = recipe.train
    output = output_dir_of(recipe)
    os.makedirs(output, exist_ok=True)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    mode = parallel.launch_mode(accelerator.num_processes)
    set_seed(config.seed)
    started = time.time()

    model, tokenizer = load_base(config.model, config.dtype)
    model.to(accelerator.device)
    data = build_data(config, tokenizer, model)
    resume_from = checkpoint.latest_checkpoint(output) if options.resume else None
    baseline_path = os.path.join(output, "baseline.json")
    show = options.progress and accelerator.is_main_process
    if not options.evaluate:
        baseline = None
    elif resume_from and os.path.exists(baseline_path):
        baseline = artifacts.read_json(baseline_path)
    else:
        baseline = baseline_metrics(model, data, recipe, progress=show)
        if accelerator.is_main_process:
            artifacts.write_json(baseline_path, baseline)

    set_seed(config.seed)  # the patch's own initialisation (MoH router) must not depend on the baseline pass
    apply_patch(model, recipe.patch)
    peft_model = wrap_lora(model, recipe.lora)
    if mode.sharded:  # FSDP2: shard first, so that the optimiser holds the DTensor shards
        parallel.shard_blocks(peft_model, model, mode)
    named = trainable_parameters(peft_model)
    optimizer = torch.optim.AdamW([p for _, p in named], lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    if mode.sharded:
        prepared_optimizer = optimizer
    else:
        peft_model, prepared_optimizer = accelerator.prepare(peft_model, optimizer)
    rows_per_step = accelerator.num_processes * config.batch * config.grad_accum
    layout = {"processes": accelerator.num_processes, "parallel": mode.kind, "rows_per_step": rows_per_step}
    start = 0
    if resume_from:
        start = checkpoint.load_checkpoint(resume_from, named, optimizer, scheduler)
        accelerator.print(f"resumed from {resume_from} (step {start})")
        _warn_if_data_order_changes(accelerator, checkpoint.read_state(resume_from), layout)
    main = accelerator.is_main_process  # data parallel: every process trains, the main one writes the files
    log = JsonlLog(os.path.join(output, "log.jsonl"), start if resume_from else None) if main else NoLog()
    aux = resolve_aux_loss(config.aux_loss)
    end_aux_stage = resolve_aux_loss(config.aux_loss, AUX_STAGE_ENDS) if config.aux_only_steps else None
    stop = min(config.steps, options.stop_after or config.steps)

    bar = _progress(config.steps, start, show)
    for step in range(start, stop):
        if end_aux_stage is not None and step >= config.aux_only_steps:  # also when resuming after the stage
            end_aux_stage(peft_model)
            end_aux_stage = None
        row = _train_step(peft_model, prepared_optimizer, scheduler, accelerator, data, config, step, aux, named,
                          mode)
        log.write(step=step + 1, **row, elapsed_s=round(time.time() - started, 2))
        bar.update(1)
        bar.set_postfix(loss=f"{row['lm_loss']:.3f}", lr=f"{row['lr']:.2e}")
        done = step + 1
        if options.evaluate and config.eval_every and done % config.eval_every == 0 and done < config.steps:
            # Periodic checks run the training patch in eval mode (for longlora/sinklora: full attention).
            result = measure(peft_model, data, config, decode=False, desc=f"eval at step {done}" if show else None)
            log.write(step=done, eval_loss=result["loss"], eval_ppl=result["ppl"])
            peft_model.train()
        if (config.save_every and done % config.save_every == 0) or done == stop:  # every process gathers
            checkpoint.save_checkpoint(checkpoint.checkpoint_dir(output, done), done, named, optimizer, scheduler,
                                       write=main, layout=layout)
    bar.close()
    accelerator.wait_for_everyone()
    if stop < config.steps:
        return {"stopped_at": stop}, None
    if mode.sharded:  # gather the trained weights; the main process finishes on an unsharded copy
        trained = parallel.gather_trainable(named)
        del peft_model, named, optimizer, prepared_optimizer, scheduler
        peft_model = _unsharded(recipe, trained, accelerator.device) if main else None
    else:
        peft_model = accelerator.unwrap_model(peft_model)
    if not main:
        return {"process_index": accelerator.process_index, "output_dir": output}, peft_model
    return _finish(peft_model, data, recipe, output, baseline, log, started, start, show, layout), peft_model


def _warn_if_data_order_changes(accelerator, saved: dict, layout: dict) -> None:
    """Resuming on another number of processes is exact only when a step still reads the same rows."""
    if "rows_per_step" in saved and saved["rows_per_step"] != layout["rows_per_step"]:
        accelerator.print(f"warning: the checkpoint's steps read {saved['rows_per_step']} rows ({saved['processes']} "
                          f"process(es)); this run's read {layout['rows_per_step']} ({layout['processes']}): the data "
                          "order and batch size change from here; keep processes x batch x grad_accum equal (e.g. "
                          "--set batch=...) to continue the same run")


def _unsharded(recipe: Recipe, trained: dict, device):
    """The trained peft model rebuilt on one process from gathered weights (what FSDP2's shards hold together)."""
    config = recipe.train
    model, _ = load_base(config.model, config.dtype)
    model.to(device)
    set_seed(config.seed)  # the patch's non-learned state as in training
    apply_patch(model, recipe.patch)
    peft_model = wrap_lora(model, recipe.lora)
    named = trainable_parameters(peft_model)
    if [n for n, _ in named] != list(trained):
        raise RuntimeError("FSDP2: the rebuilt model's trainable parameters differ from the trained ones")
    for name, param in named:
        parallel.copy_full_(param, trained[name])
    return peft_model


def _train_step(model, optimizer, scheduler, accelerator, data, config, step, aux, named, mode) -> dict:
    model.train()
    lm_total, aux_total = 0.0, 0.0
    aux_stage = step < config.aux_only_steps  # the first stage of a two-stage recipe: aux loss alone
    for micro in range(config.grad_accum):
        inputs = data.inputs(config, step, micro, accelerator.process_index, accelerator.num_processes)
        inputs = {k: v.to(accelerator.device) for k, v in inputs.items()}
        loss = model(**inputs).loss
        lm_total += float(loss.detach()) / config.grad_accum
        if aux is not None and (aux_stage or not config.aux_only_steps):
            extra = aux(model) * config.aux_weight
            aux_total += float(extra.detach()) / config.grad_accum
            if aux_stage:  # DDP's gradient averaging and FSDP2's gathers for backward hang on the model's output,
                # which a loss computed inside the blocks alone (hybrid's transfer loss) never reaches: add it at 0
                loss = extra + 0.0 * loss if mode.kind != "single" else extra
            else:
                loss = loss + extra
        accelerator.backward(loss / config.grad_accum)
    if aux_stage:  # only the patch's own parameters move (AdamW skips parameters without a gradient)
        for name, param in named:
            if ".patchattn." not in name:
                param.grad = None
    params = [p for _, p in named]
    if mode.sharded:
        grad_norm = parallel.clip_grad_norm(params, config.max_grad_norm)
    else:
        grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if accelerator.num_processes > 1:  # the logged losses are the mean over every process's rows
        lm_total, aux_total = accelerator.reduce(torch.tensor([lm_total, aux_total], device=accelerator.device),
                                                 reduction="mean").tolist()
    total = aux_total if aux_stage else lm_total + aux_total
    row = {"loss": total, "lm_loss": lm_total, "lr": lr, "grad_norm": float(grad_norm)}
    if aux_stage:
        row["stage"] = "aux_only"
    if aux is not None:
        row["aux_loss"] = aux_total
    return row


def _finish(peft_model, data, recipe, output, baseline, log, started, resumed_at, show=False, layout=None) -> dict:
    config = recipe.train
    evaluated = baseline is not None
    if evaluated:
        trained = {"training_attention": measure(peft_model, data, config, training_attention=True,
                                                 desc="eval after (training attention)" if show else None)}
    artifacts.save_artifacts(output, peft_model, recipe)
    # "after": the inference patch applied the way patchattn.load(adapter=...) applies it.
    base = inner_model(peft_model)
    if api.get_handle(base) is not None:
        api.unpatch(base)
    artifacts.apply_inference_patch(base, output)
    if not evaluated:  # --no-eval: the artifacts and the loss curve only
        metrics = {**_run_facts(recipe, data, started, resumed_at, layout), "evaluated": False}
        artifacts.write_json(os.path.join(output, "metrics.json"), metrics)
        artifacts.plot_loss(os.path.join(output, "log.jsonl"), os.path.join(output, "loss.png"),
                            f"{recipe.name}: {config.model}, seq {config.seq_len}, {config.steps} steps")
        return metrics
    trained["inference"] = measure(peft_model, data, config, desc="eval after (inference patch)" if show else None)
    log.write(step=config.steps, eval_loss=trained["inference"]["loss"], eval_ppl=trained["inference"]["ppl"])
    metrics = {
        **_run_facts(recipe, data, started, resumed_at, layout),
        "ppl_dense": baseline["dense"]["ppl"],
        "ppl_before": baseline["before"]["ppl"],
        "ppl_after": trained["inference"]["ppl"],
        "ppl_training_attention_before": baseline["before_training_attention"]["ppl"],
        "ppl_training_attention_after": trained["training_attention"]["ppl"],
    }
    if config.decode_eval:
        metrics["decode_eval"] = dict(config.decode_eval)
        metrics["decode_ppl_dense"] = baseline["dense"]["decode_ppl"]
        metrics["decode_ppl_before"] = baseline["before"]["decode_ppl"]
        metrics["decode_ppl_after"] = trained["inference"]["decode_ppl"]
    artifacts.write_json(os.path.join(output, "metrics.json"), metrics)
    artifacts.plot_loss(os.path.join(output, "log.jsonl"), os.path.join(output, "loss.png"),
                        f"{recipe.name}: {config.model}, seq {config.seq_len}, {config.steps} steps",
                        before_loss=baseline["before"]["loss"])
    return metrics


def _run_facts(recipe, data, started, resumed_at, layout=None) -> dict:
    """What the run was: recipe, model, sizes, patches, processes, wall time (every metrics.json has these)."""
    config = recipe.train
    layout = layout or {"processes": 1, "parallel": "single", "rows_per_step": config.batch * config.grad_accum}
    return {
        "recipe": recipe.name,
        "model": config.model,
        "steps": config.steps,
        "seq_len": config.seq_len,
        "tokens_per_step": config.seq_len * layout["rows_per_step"],
        "processes": layout["processes"],
        "parallel": layout["parallel"],
        "heldout_tokens": int(data.heldout.numel()),
        "eval_seq_len": config.eval_length,
        "inference_patch": recipe.inference,
        "training_patch": recipe.patch,
        "wall_time_s": round(time.time() - started, 1),
        "resumed_at_step": resumed_at or None,
        "environment": report.environment(),  # commit, GPU, versions: the figure's stamp
    }
