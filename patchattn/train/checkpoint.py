"""Checkpoints without pickle: everything a resumed run needs, as safetensors plus one JSON file.

``<output>/checkpoints/step-000050/``
    ``trainable.safetensors``  every trainable parameter (LoRA, modules_to_save copies, patch-state parameters)
    ``optimizer.safetensors``  AdamW's per-parameter state (``<i>.exp_avg``, ``<i>.exp_avg_sq``, ``<i>.step``),
                               ``i`` = position in the trainable-parameter list
    ``rng.safetensors``        torch's CPU (and CUDA) generator states
    ``state.json``             step, optimiser hyper-parameters per group, scheduler state, parameter names
Loading reads tensors with safetensors and numbers with json: nothing in a checkpoint can execute code.  Which
batch a step reads is a function of (seed, step), so no data-loader state is needed.

Several processes: tensors are saved whole (gathered from FSDP2 shards, ``parallel.full_tensor``; under DDP every
process holds them whole), every process takes part in the gathering and the main one writes.  Loading copies each
process's share back, so a checkpoint resumes on any number of processes (``state.json`` records how many wrote it
and how many rows a step read, to warn when a resume changes the data order).
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from .parallel import copy_full_, full_tensor, like

CHECKPOINTS = "checkpoints"


def checkpoint_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, CHECKPOINTS, f"step-{step:06d}")


def latest_checkpoint(output_dir: str) -> str | None:
    root = os.path.join(output_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return None
    done = [d for d in sorted(os.listdir(root)) if os.path.exists(os.path.join(root, d, "state.json"))]
    return os.path.join(root, done[-1]) if done else None


def _plain(value):
    return value.item() if isinstance(value, torch.Tensor) else value


def save_checkpoint(path: str, step: int, named_params, optimizer, scheduler, *, write: bool = True,
                    layout: dict | None = None) -> None:
    """Gather and (when ``write``: the main process) save; every process of a sharded run must call it."""
    names = [n for n, _ in named_params]
    params = {n: full_tensor(p) for n, p in named_params}
    tensors = {}
    for i, (_, param) in enumerate(named_params):  # parameter order: the same collectives on every process
        for key, value in sorted(optimizer.state.get(param, {}).items()):
            tensors[f"{i}.{key}"] = full_tensor(torch.as_tensor(value))
    if not write:
        return
    os.makedirs(path, exist_ok=True)
    save_file(params, os.path.join(path, "trainable.safetensors"))
    save_file(tensors, os.path.join(path, "optimizer.safetensors"))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, os.path.join(path, "rng.safetensors"))
    groups = [{k: _plain(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    state = {"step": step, "param_names": names, "param_groups": groups, "scheduler": sched, **(layout or {})}
    # state.json last: a checkpoint without it is incomplete and ignored by latest_checkpoint.
    with open(os.path.join(path, "state.json"), "w", encoding="utf-8") as handle:
        json.dump(state, handle, indent=1)


def read_state(path: str) -> dict:
    """A checkpoint's ``state.json`` (step, names, optimiser groups, scheduler, and the process layout if recorded)."""
    with open(os.path.join(path, "state.json"), encoding="utf-8") as handle:
        return json.load(handle)


def load_checkpoint(path: str, named_params, optimizer, scheduler) -> int:
    """Restore parameters, optimiser, scheduler and RNG in place; returns the step the checkpoint was saved at."""
    state = read_state(path)
    names = [n for n, _ in named_params]
    if state["param_names"] != names:
        raise ValueError(f"checkpoint {path} was saved for other trainable parameters (different recipe or LoRA "
                         "config); start a fresh output directory or drop --resume")
    saved = load_file(os.path.join(path, "trainable.safetensors"))
    for name, param in named_params:
        copy_full_(param, saved[name])
    tensors = load_file(os.path.join(path, "optimizer.safetensors"))
    optimizer.state.clear()
    for key, value in tensors.items():
        i, field = key.split(".", 1)
        param = named_params[int(i)][1]
        optimizer.state[param][field] = like(param, value) if field != "step" else value
    for group, saved_group in zip(optimizer.param_groups, state["param_groups"], strict=True):
        group.update(saved_group)
    scheduler.load_state_dict({**scheduler.state_dict(), **state["scheduler"]})
    rng = load_file(os.path.join(path, "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available() and "cuda0" in rng:
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng])
    return int(state["step"])
