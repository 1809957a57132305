"""How a run spreads over processes: one process, DDP (accelerate), or FSDP2 (torch's ``fully_shard``).

``accelerate launch --config_file patchattn/recipes/accelerate/<mode>.yaml -m patchattn.train RECIPE`` picks the
mode: accelerate turns the config into environment variables (``ACCELERATE_USE_FSDP``, ``FSDP_VERSION``,
``FSDP_RESHARD_AFTER_FORWARD``, ...) and starts the processes; :func:`launch_mode` reads them back -- the launch
protocol of accelerate, not an option of patchattn.  Sharding is done here with ``fully_shard`` rather than by
``Accelerator.prepare``: accelerate enables FSDP only on accelerators (on CPU its state stays ``MULTI_CPU``), and
one code path for CPU (gloo, the tests) and GPU (NCCL) keeps what the tests check what users run.

FSDP2 shards every transformer block (the model's ``_no_split_modules``, accelerate's ``TRANSFORMER_BASED_WRAP``)
and then the root; parameters become ``DTensor`` shards, LoRA weights and patch-state parameters (``.patchattn.``:
MoH routers, gates, temperatures...) alike, since they live inside the blocks.  Checkpoints and artifacts hold
full tensors gathered from the shards (:func:`full_tensor`), so they load on any number of processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .recipe import RecipeError

MODES = ("single", "ddp", "fsdp2")
# accelerate settings the FSDP2 path does not implement: fail loudly rather than silently ignore them
UNSUPPORTED_FSDP = {"FSDP_OFFLOAD_PARAMS": "fsdp_offload_params", "FSDP_ACTIVATION_CHECKPOINTING":
                    "fsdp_activation_checkpointing", "FSDP_CPU_RAM_EFFICIENT_LOADING": "fsdp_cpu_ram_efficient_loading"}


@dataclass(frozen=True)
class ParallelMode:
    """``kind``: one of ``MODES``; ``reshard_after_forward``: FSDP2 frees the gathered block after its forward."""

    kind: str = "single"
    reshard_after_forward: bool = True

    @property
    def sharded(self) -> bool:
        return self.kind == "fsdp2"


def _flag(name: str, default: bool = False) -> bool:
    return os.environ.get(name, str(default)).strip().lower() in ("1", "true", "yes")


def launch_mode(num_processes: int) -> ParallelMode:
    """The mode ``accelerate launch`` (or ``torchrun``: DDP) started this process in."""
    if not _flag("ACCELERATE_USE_FSDP"):
        return ParallelMode("ddp" if num_processes > 1 else "single")
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise RecipeError(f"the accelerate config asks for FSDP version {version}; patchattn train supports FSDP2 "
                          "only: set `fsdp_version: 2` (see patchattn/recipes/accelerate/fsdp2.yaml)")
    for env, key in UNSUPPORTED_FSDP.items():
        if _flag(env):
            raise RecipeError(f"the accelerate config sets {key}: true, which patchattn train's FSDP2 path does not "
                              f"implement; set it to false (see patchattn/recipes/accelerate/fsdp2.yaml)")
    mixed = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if mixed != "no":
        raise RecipeError(f"the accelerate config sets mixed_precision: {mixed}; under FSDP2 patchattn train runs the "
                          "recipe's dtype (train.json `dtype`: float32 or bfloat16): set mixed_precision: 'no'")
    return ParallelMode("fsdp2", reshard_after_forward=_flag("FSDP_RESHARD_AFTER_FORWARD", True))


def shard_blocks(peft_model, base_model, mode: ParallelMode) -> None:
    """``fully_shard`` every transformer block of ``base_model`` (inside ``peft_model``), then the whole model."""
    from torch.distributed.fsdp import fully_shard

    block_names = set(getattr(base_model, "_no_split_modules", None) or ())
    blocks = [m for m in peft_model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise RecipeError(f"FSDP2: {type(base_model).__name__} names no transformer block class "
                          "(_no_split_modules); this model can train with DDP only")
    for block in blocks:
        fully_shard(block, reshard_after_forward=mode.reshard_after_forward)
    fully_shard(peft_model, reshard_after_forward=mode.reshard_after_forward)


def is_sharded(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on CPU (a collective for a ``DTensor`` shard: every process must call it)."""
    if is_sharded(tensor):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu().contiguous()


def like(target: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``target``: this process's shard of it when ``target`` is a ``DTensor``."""
    if is_sharded(target):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(target.device, target.dtype), target.device_mesh, target.placements)
    return full.to(target.device, target.dtype)


def copy_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the whole tensor ``full`` into ``param`` (its shard of it, when sharded)."""
    with torch.no_grad():
        if is_sharded(param):
            param.to_local().copy_(like(param, full).to_local())
        else:
            param.copy_(full)


def gather_trainable(named) -> dict[str, torch.Tensor]:
    """Every trainable parameter as a whole CPU tensor (collective under FSDP2)."""
    return {name: full_tensor(p) for name, p in named}


def clip_grad_norm(params, max_norm: float) -> float:
    """``clip_grad_norm_`` over sharded or plain gradients; the norm of the whole (unsharded) gradient."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if is_sharded(norm):
        norm = norm.full_tensor()
    return float(norm)
