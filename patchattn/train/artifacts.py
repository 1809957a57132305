"""What a finished run leaves in its output folder (``patchattn.load(..., adapter=...)`` in ``api`` reads it back).

``adapter/``              the LoRA adapter (peft ``save_pretrained``: safetensors + adapter_config.json)
``patch.json``            the inference patch (what the tuned model runs) and the training patch, for the record
``patch_state.safetensors`` every learned patch-state parameter (names contain ``.patchattn.``: MoH routers...)
``recipe.json``           the recipe as run (with CLI overrides), including the base model's name
``metrics.json``          held-out perplexity: dense base model, before tuning, after tuning (+ variants)
``log.jsonl``             one line per step (loss, lr, grad norm, time) and per evaluation
``loss.png``              the loss curve
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from ..api import (ADAPTER_DIR, PATCH_FILE, PATCH_STATE_FILE, RECIPE_FILE, apply_inference_patch, load_patch_state,
                   load_tuned, patch_parameters, read_json)
from .model import inner_model

__all__ = ["ADAPTER_DIR", "PATCH_FILE", "PATCH_STATE_FILE", "RECIPE_FILE", "apply_inference_patch",
           "load_patch_state", "load_tuned", "plot_loss", "read_json", "save_artifacts", "write_json"]


def save_artifacts(output_dir: str, peft_model, recipe) -> None:
    os.makedirs(output_dir, exist_ok=True)
    peft_model.save_pretrained(os.path.join(output_dir, ADAPTER_DIR))
    params = {n: p.detach().cpu().contiguous() for n, p in patch_parameters(inner_model(peft_model)).items()}
    save_file(params, os.path.join(output_dir, PATCH_STATE_FILE))
    write_json(os.path.join(output_dir, PATCH_FILE), {"inference": recipe.inference, "training": recipe.patch})
    write_json(os.path.join(output_dir, RECIPE_FILE), recipe.to_dict())


def write_json(path: str, data) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1)
        handle.write("\n")


def plot_loss(log_path: str, out_path: str, title: str, before_loss: float | None = None, *,
              loss_key: str = "lm_loss", ylabel: str = "next-token loss (nats)") -> None:
    """Train loss per step (and its running mean) plus held-out loss; ``before_loss`` is drawn at step 0."""
    import matplotlib  # optional plotting dependency: only when a run draws its loss curve

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = [], []
    eval_steps, eval_losses = ([0], [before_loss]) if before_loss is not None else ([], [])
    with open(log_path, encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            if "loss" in row:
                steps.append(row["step"])
                losses.append(row[loss_key])
            if "eval_loss" in row:
                eval_steps.append(row["step"])
                eval_losses.append(row["eval_loss"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, lw=1, alpha=0.6, label="train loss (training attention)")
    if len(losses) >= 10:
        window = max(5, len(losses) // 20)
        smooth = torch.tensor(losses).unfold(0, window, 1).mean(1).tolist()
        ax.plot(steps[window - 1:], smooth, lw=2, label=f"train loss, {window}-step mean")
    if eval_steps:
        ax.plot(eval_steps, eval_losses, "o-", label="held-out loss (inference attention)")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
