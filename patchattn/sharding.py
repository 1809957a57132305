"""Tensor parallelism (transformers' ``tp_plan``) and device maps: which heads and which device each layer's
patch state belongs to.

Under transformers' tensor parallelism (``from_pretrained(..., distributed_config=DistributedConfig(tp_size=N))``,
or the older ``tp_plan="auto"``) the q/k/v projections are column-sharded and ``o_proj`` row-sharded: rank ``r`` of
``N`` computes query heads ``[r*H/N, (r+1)*H/N)`` and KV heads ``[r*Hkv/N, (r+1)*Hkv/N)``, and the attention
function sees only those.  ``HeadShard`` says so once, at patch time (read from the projections' DTensor placements,
not from environment variables); it is ``PatchContext.shard``.  Each method's per-head plan is built for all heads
of the model (artifacts are calibrated per model) and then cut to the rank's heads by ``shard_state``, so every
rank runs exactly the heads the single-process patched model runs.  Methods whose result for a head depends on
other heads (MoH's routing ranks all routed heads) gather what they need through ``HeadShard.gather``.

Methods not listed in ``TENSOR_PARALLEL_METHODS`` are refused under tensor parallelism with a ``ValueError``:
their per-head state or cross-head reductions have not been checked against the single-process model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Methods whose tensor-parallel output equals the single-process one (tests/distributed/test_tensor_parallel.py).
# Head-local methods: each head's output depends on that head's q/k/v and the config only.
HEAD_LOCAL_METHODS = frozenset({"dense", "streaming", "blocktopk", "hip", "power", "softplus"})
# Methods with per-head state, cut to the rank's heads by their state's ``shard_heads``; ``moh`` gathers the
# routing inputs of all heads (its top-k ranks all routed heads).
PER_HEAD_METHODS = frozenset({"duo", "moa", "act", "headscale", "moh"})
TENSOR_PARALLEL_METHODS = HEAD_LOCAL_METHODS | PER_HEAD_METHODS

Q_PROJ, K_PROJ, V_PROJ, O_PROJ = "q_proj", "k_proj", "v_proj", "o_proj"


@dataclass(frozen=True)
class HeadShard:
    """The heads of every attention layer this process holds under tensor parallelism.

    Attributes:
        rank: this process's index in the tensor-parallel group.
        world_size: the group's size (heads and KV heads are split in ``world_size`` equal contiguous blocks).
        heads: query heads of a layer in the whole model.
        kv_heads: KV heads of a layer in the whole model.
        group: the tensor-parallel process group (``HeadShard.gather`` runs over it); None in a simulated shard.
    """

    rank: int
    world_size: int
    heads: int
    kv_heads: int
    group: Any = None

    def __post_init__(self):
        for name, count in (("heads", self.heads), ("kv_heads", self.kv_heads)):
            if count % self.world_size:
                raise ValueError(f"tensor parallelism over {self.world_size} ranks needs {name} divisible by "
                                 f"{self.world_size}; the model has {count}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside the tensor-parallel group of {self.world_size}")

    @property
    def local_heads(self) -> int:
        return self.heads // self.world_size

    @property
    def local_kv_heads(self) -> int:
        return self.kv_heads // self.world_size

    @property
    def head_offset(self) -> int:
        """Global index of this rank's first query head."""
        return self.rank * self.local_heads

    @property
    def kv_head_offset(self) -> int:
        return self.rank * self.local_kv_heads

    def local(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This rank's part of a tensor indexed by query head (size ``heads``) or KV head (size ``kv_heads``)
        along ``dim``; the size says which (they agree when ``heads == kv_heads``)."""
        size = tensor.shape[dim]
        if size == self.heads:
            return tensor.narrow(dim, self.head_offset, self.local_heads)
        if size == self.kv_heads:
            return tensor.narrow(dim, self.kv_head_offset, self.local_kv_heads)
        raise ValueError(f"a per-head tensor has {size} entries along dim {dim}; the model has {self.heads} query "
                         f"heads and {self.kv_heads} KV heads")

    def local_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """The global query-head indices that are this rank's, as local indices (ascending order kept)."""
        mine = (indices >= self.head_offset) & (indices < self.head_offset + self.local_heads)
        return indices[mine] - self.head_offset

    def local_keys(self, by_head: dict[int, Any]) -> dict[int, Any]:
        """A ``{global query head: value}`` dict cut to this rank's heads, keyed by local index."""
        start, stop = self.head_offset, self.head_offset + self.local_heads
        return {h - start: v for h, v in by_head.items() if start <= h < stop}

    def gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """All ranks' heads along ``dim``, in global head order (an all-gather over the group; differentiable)."""
        from torch.distributed.nn.functional import all_gather

        if self.group is None:
            raise RuntimeError("HeadShard.gather needs the tensor-parallel process group (a simulated shard has none)")
        moved = tensor.movedim(dim, 0).contiguous()
        return torch.cat(all_gather(moved, group=self.group), dim=0).movedim(0, dim)


# ---- reading the shard from a model -----------------------------------------------------------------------------
def _placement(weight) -> tuple[int, int, int, Any] | None:
    """``(shard dim, rank, size, group)`` of a DTensor weight sharded on one mesh dim; None for a plain tensor or a
    replicated one (each rank holds all of it)."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # a torch without torch.distributed
        return None
    if not isinstance(weight, DTensor):
        return None
    mesh, placements = weight.device_mesh, weight.placements
    sharded = [(i, p.dim) for i, p in enumerate(placements) if isinstance(p, Shard) and mesh.size(i) > 1]
    if not sharded:
        return None
    if len(sharded) > 1:
        raise ValueError(f"patchattn supports one tensor-parallel mesh dimension per projection; this weight has "
                         f"placements {placements}")
    mesh_dim, tensor_dim = sharded[0]
    return tensor_dim, mesh.get_local_rank(mesh_dim), mesh.size(mesh_dim), mesh.get_group(mesh_dim)


def module_shard(module: nn.Module) -> HeadShard | None:
    """The ``HeadShard`` of one transformers attention module, from its projections' DTensor placements; None when
    they are plain tensors (one process, or data parallelism only).

    Raises ValueError when the projections are sharded in any way other than transformers' head split (q/k/v
    ``colwise``: weight dim 0; ``o_proj`` ``rowwise``: weight dim 1) or when the heads do not divide evenly.
    """
    found = {}
    for name in (Q_PROJ, K_PROJ, V_PROJ, O_PROJ):
        child = getattr(module, name, None)
        weight = getattr(child, "weight", None)
        found[name] = _placement(weight) if weight is not None else None
    sharded = {name: p for name, p in found.items() if p is not None}
    if not sharded:
        if any(_placement(p) is not None for p in module.parameters()):
            raise ValueError(f"{type(module).__name__} has tensor-parallel weights but no q_proj/k_proj/v_proj/"
                             "o_proj: patchattn supports tensor parallelism on separate q/k/v/o projections only")
        return None
    expected = {Q_PROJ: 0, K_PROJ: 0, V_PROJ: 0, O_PROJ: 1}
    wrong = [f"{name}: {'not sharded' if name not in sharded else f'sharded on weight dim {sharded[name][0]}'}"
             for name, dim in expected.items() if name not in sharded or sharded[name][0] != dim]
    if wrong:
        raise ValueError(f"patchattn supports tensor parallelism that splits heads: q_proj/k_proj/v_proj 'colwise' "
                         f"(weight dim 0) and o_proj 'rowwise' (weight dim 1), transformers' default tp_plan; "
                         f"{type(module).__name__} has {'; '.join(wrong)}")
    _, rank, size, group = sharded[Q_PROJ]
    config = module.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return HeadShard(rank=rank, world_size=size, heads=heads, kv_heads=kv_heads, group=group)


def model_shard(modules: list[nn.Module]) -> HeadShard | None:
    """The one ``HeadShard`` of the attention modules being patched (None without tensor parallelism).

    ValueError when some are sharded and some not, or they disagree (different head counts or groups)."""
    shards = [module_shard(m) for m in modules]
    distinct = {(s.rank, s.world_size, s.heads, s.kv_heads) if s is not None else None for s in shards}
    if len(distinct) > 1:
        raise ValueError(f"the attention layers are split differently across tensor-parallel ranks "
                         f"({sorted(map(str, distinct))}); patchattn supports one head split for all patched layers "
                         "(a decoder-only LLM under transformers' default tp_plan)")
    return shards[0] if shards else None


def check_supported(method: str, kind: str) -> None:
    """ValueError naming what is supported when ``method`` (on a model of ``kind``) cannot run tensor-parallel."""
    if kind != "llm":
        raise ValueError(f"patchattn supports tensor parallelism on decoder-only LLMs; this is a {kind!r} model "
                         "(run it in one process, or with device_map across devices)")
    if method not in TENSOR_PARALLEL_METHODS:
        raise ValueError(f"method {method!r} has not been made tensor-parallel (its per-head state or cross-head "
                         f"steps are not split by rank); supported under tensor parallelism: "
                         f"{', '.join(sorted(TENSOR_PARALLEL_METHODS))}")


def shard_state(state, shard: HeadShard) -> None:
    """Cut one layer's per-head method state to the rank's heads (in place; ``state`` is a ``PatchState``)."""
    if state.method_state is not None:
        state.method_state.shard_heads(shard)


# ---- device maps --------------------------------------------------------------------------------------------------
def module_device(module: nn.Module) -> torch.device | None:
    """The device of a module's own weights (the local shard's device for a DTensor); None without any."""
    for param in module.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        return local.device
    return None


def place_state(state: nn.Module, module: nn.Module) -> None:
    """Put a new ``PatchState`` (its parameters and the method state's device tensors) on its layer's device.

    With ``device_map="auto"`` each decoder layer may sit on another device; a state made on the CPU (plans built
    from artifacts) would otherwise be copied to the layer's device at every call, or mixed with it in an op.
    Tensors a method keeps on the host on purpose (not in its ``DEVICE_FIELDS``) stay there."""
    device = module_device(module)
    if device is not None:
        state.to(device)
