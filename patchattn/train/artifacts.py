"""What a finished run leaves in its output folder, and how ``patchattn.load(..., adapter=...)`` reads it back.

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
import warnings

import torch
from safetensors.torch import load_file, save_file

from .model import apply_patch, inner_model, load_base, patch_parameters

ADAPTER_DIR = "adapter"
PATCH_FILE = "patch.json"
PATCH_STATE_FILE = "patch_state.safetensors"
RECIPE_FILE = "recipe.json"


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


def read_json(path: str):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {os.path.dirname(path)!r} the output folder of a finished "
                                "`patchattn train` run?")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def load_patch_state(model, path: str) -> None:
    """Copy saved patch-state parameters into a freshly patched model; every saved and expected name must match."""
    saved = load_file(path)
    expected = patch_parameters(model)
    if set(saved) != set(expected):
        missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
        raise ValueError(f"{path} does not fit this patch: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(saved[name])


def apply_inference_patch(model, output_dir: str, patch: dict | None = None):
    """Patch ``model`` with the run's inference patch and load its learned patch state (when it has any)."""
    patch = patch or read_json(os.path.join(output_dir, PATCH_FILE))["inference"]
    if patch.get("method") == "dense":
        return  # full attention: the model's own, exactly
    apply_patch(model, patch)
    if patch_parameters(model):
        load_patch_state(model, os.path.join(output_dir, PATCH_STATE_FILE))


def load_tuned(name_or_path: str | None, adapter: str, *, dtype=None, merge: bool = False):
    """(model, tokenizer): the base model, the run's inference patch and patch state, and its LoRA adapter.

    ``name_or_path=None`` takes the base model the run trained.  ``merge=True`` folds LoRA into the weights
    (``merge_and_unload``): faster, equal up to rounding.
    """
    from peft import PeftModel

    recipe = read_json(os.path.join(adapter, RECIPE_FILE))
    trained_on = recipe["train"]["model"]
    if name_or_path is None:
        name_or_path = trained_on
    elif name_or_path != trained_on:
        warnings.warn(f"adapter {adapter!r} was trained on {trained_on!r}, loading it onto {name_or_path!r}",
                      stacklevel=3)
    dtype_name = str(dtype).replace("torch.", "") if dtype is not None else recipe["train"].get("dtype", "float32")
    model, tokenizer = load_base(name_or_path, dtype_name)
    apply_inference_patch(model, adapter)
    model = PeftModel.from_pretrained(model, os.path.join(adapter, ADAPTER_DIR))
    model.eval()
    if merge:
        model = model.merge_and_unload()
    return model, tokenizer


def plot_loss(log_path: str, out_path: str, title: str, before_loss: float | None = None) -> None:
    """Train loss per step (and its running mean) plus held-out loss; ``before_loss`` is drawn at step 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = [], []
    eval_steps, eval_losses = ([0], [before_loss]) if before_loss is not None else ([], [])
    with open(log_path, encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            if "loss" in row:
                steps.append(row["step"])
                losses.append(row["lm_loss"])
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
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
