"""Which key blocks a method reads, for one layer and head, on a real input (the report's block images).

The block lists are captured from the real forward of the patched model: every sparse method hands its lists to
``block_sparse_attention`` in ``methods/_sparse.py``, so wrapping that one call (for the duration of one forward)
sees exactly what the kernel was asked to read.  A layer that runs dense (a method's dense layers, sliding-window
layers) reads every causally allowed block.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .. import api
from ..kernels.blocksparse import mask_from_blocks
from ..methods import _sparse
from ..state import get_state


@dataclass
class BlockMap:
    """The key blocks one (layer, head) read: ``mask[i, j]`` is True when query block i read key block j."""

    method: str
    layer: int
    head: int
    length: int
    block_size: int
    mask: torch.Tensor  # bool [NQ, NK]
    dense: bool  # True when the layer ran dense attention (every causal block read)

    @property
    def density(self) -> float:
        """Fraction of the causally allowed blocks that were read."""
        allowed = torch.ones_like(self.mask).tril()
        return float((self.mask & allowed).sum() / allowed.sum())

    def to_json(self) -> dict:
        return {"method": self.method, "layer": self.layer, "head": self.head, "length": self.length,
                    "block_size": self.block_size, "dense": self.dense, "density": self.density,
                    "mask": ["".join("1" if v else "0" for v in row) for row in self.mask.tolist()]}


def mask_from_json(data: dict) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in row] for row in data["mask"]], dtype=torch.bool)


@contextmanager
def _capture_block_lists(layer_of_call: list, wanted_layer: int, captured: list):
    """Record (kv_indices, kv_counts, geometry) of the block-sparse calls made while ``wanted_layer`` runs."""
    original = _sparse.block_sparse_attention

    def recording(query, key, value, kv_indices, kv_counts, *, block_q, block_k, **kwargs):
        if layer_of_call and layer_of_call[-1] == wanted_layer:
            captured.append((kv_indices.detach().cpu(), kv_counts.detach().cpu(), query.shape, key.shape,
                             block_q, block_k))
        return original(query, key, value, kv_indices, kv_counts, block_q=block_q, block_k=block_k, **kwargs)

    _sparse.block_sparse_attention = recording
    try:
        yield
    finally:
        _sparse.block_sparse_attention = original


def _head_row(n_heads_listed: int, n_q_heads: int, n_kv_heads: int, head: int) -> int:
    """Which row of a block list (shared, per kv head or per q head) holds query head ``head``."""
    if n_heads_listed == 1:
        return 0
    if n_heads_listed == n_q_heads:
        return head
    if n_heads_listed == n_kv_heads:
        return head // (n_q_heads // n_kv_heads)
    raise ValueError(f"block list has {n_heads_listed} heads; model has {n_q_heads} q / {n_kv_heads} kv heads")


@torch.no_grad()
def read_blocks(model, input_ids: torch.Tensor, method: str, overrides: dict | None = None, *, layer: int,
                head: int = 0) -> BlockMap:
    """Patch ``model`` with ``method``, run ``input_ids`` ``[1, T]`` once, and return the blocks that layer and head
    read (the model is unpatched afterwards)."""
    overrides = dict(overrides or {})
    block_size = int(overrides.get("block_size", getattr(api.get_config(method), "block_size", 64)))
    length = input_ids.shape[1]
    captured: list = []
    layer_of_call: list = []
    with api.patched(model, method, **overrides) as handle:
        hooks = [_layer_tracker(model.get_submodule(name), layer_of_call) for name in handle.modules]
        try:
            with _capture_block_lists(layer_of_call, layer, captured):
                model(input_ids=input_ids.to(model.device))
        finally:
            for hook in hooks:
                hook.remove()
    n_blocks = -(-length // block_size)
    if not captured:  # the layer ran dense: every causal block
        mask = torch.ones(n_blocks, n_blocks, dtype=torch.bool).tril()
        return BlockMap(method, layer, head, length, block_size, mask, dense=True)
    kv_indices, kv_counts, q_shape, k_shape, _block_q, block_k = captured[0]
    full = mask_from_blocks(kv_indices, kv_counts, -(-k_shape[2] // block_k))
    row = _head_row(full.shape[1], q_shape[1], k_shape[1], head)
    return BlockMap(method, layer, head, length, block_size, full[0, row], dense=False)


def _layer_tracker(module, layer_of_call: list):
    def before(mod, _args):
        state = get_state(mod)
        layer_of_call.append(state.layer_index if state is not None else -1)

    return module.register_forward_pre_hook(before)
