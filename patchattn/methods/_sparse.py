"""What every block-sparse method shares: turn a transformers attention call into one block-sparse kernel call.

A sparse method only decides *which key blocks each query block reads* (its selector, registered with
``register_sparse_method``); this module handles the rest the same way for all of them: padding, sliding-window
layers, the KV-cache offset, caching static patterns per shape, calling ``kernels.blocksparse`` with the method's backend, and reporting the density.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import MethodConfig, option
from ..kernels.blocksparse import block_sparse_attention, blocks_from_mask, density_tensor
from ..kernels.dense import eager_attention, sdpa_attention
from ..masks import BlockGeometry, causal_allowed, runs_lists
from ..registry import register_method
from ..state import MethodState
from ._budget import DENSITY_HELP, budget_applied, check_density, check_density_fields

# (geometry, query, key, state) -> bool block mask [B' or 1, H' (1, Hkv or Hq), NQ, NK], or ready block lists
# (kv_indices, kv_counts) when the method builds them directly (blocktopk while decoding).
BlockSelector = Callable[[BlockGeometry, torch.Tensor, torch.Tensor, object], "torch.Tensor | tuple"]


LAST_BLOCK_DENSE_HELP = ("at prefill, the last query block reads every key (O(T) extra work): it produces the first "
                         "generated token, so retrieval does not hinge on one estimate")


@dataclass(kw_only=True)
class SparseConfig(MethodConfig):
    """Fields every block-sparse method has.

    Attributes:
        block_size (int): query and key block size in tokens (the unit of sparsity).
        dense_layers (list[int]): layer indices kept dense (HiP and DuoAttention keep the first layers dense).
        density (float | None): the common budget knob (``_budget.py``, docs/density.md): target fraction of the causal
            block pairs read, mapped per call to the method's ``DENSITY_FIELDS`` by ``fields_for_density``.
    """

    block_size: int = option(64, "query/key block size in tokens", choices=(16, 32, 64, 128, 256))
    dense_layers: list = option([], "layer indices that stay dense", min=0, index="layer")
    last_block_dense: bool = option(False, LAST_BLOCK_DENSE_HELP)
    density: float | None = option(None, DENSITY_HELP, min=0.0, max=1.0)

    # The fields ``density`` sets (they must stay at their defaults when it is given).
    DENSITY_FIELDS: ClassVar[tuple] = ()

    def __post_init__(self):
        check_density(self.density, self.where("density"))  # (0, 1], before the generic range check's message
        super().__post_init__()
        if self.density is not None and type(self).fields_for_density is SparseConfig.fields_for_density:
            raise ValueError(f"{type(self).__name__} cannot honour density (no mapping to its own fields)")
        defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                    for f in dataclasses.fields(self) if f.name in self.DENSITY_FIELDS}
        check_density_fields(self, self.DENSITY_FIELDS, defaults)

    def fields_for_density(self, density: float, geometry: BlockGeometry) -> dict:
        """This method's budget fields that read ``density`` of the causal block pairs of a full causal forward of
        ``geometry`` (queries = keys); each sparse method overrides it."""
        raise NotImplementedError

    def max_blocks_per_row(self, n_k: int) -> int:
        """An upper bound on the blocks one query block reads: decode lists get this width without a host sync."""
        return n_k


@dataclass
class SparseState(MethodState):
    """What the block-sparse glue keeps per module: the latest static pattern's lists and the (geometry, device) they
    were built for.  Each sparse method's state extends it."""

    static_key: tuple | None = None
    static_blocks: tuple | None = None


def dense_call(module, query, key, value, attention_mask, *, scaling, dropout=0.0, **kwargs):
    """The model's own (SDPA / soft-capped eager) attention."""
    fn = eager_attention if kwargs.get("softcap") is not None else sdpa_attention
    return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def padding_start(attention_mask, batch: int, kv_len: int) -> torch.Tensor | None:
    """``[B]`` first valid key per sample when the mask is causal + left padding; None if there is no mask.

    Raises ValueError when the mask has another structure (sliding window, bidirectional image tokens), which a
    block list plus a padding start cannot express.
    """
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.bool or attention_mask.ndim != 4 or attention_mask.shape[1] != 1:
        raise ValueError("expected transformers' boolean SDPA mask [B, 1, Tq, Tk]")
    mask = attention_mask[:, 0, :, :kv_len]
    q_len = mask.shape[1]
    start = mask[:, -1].int().argmax(dim=-1)
    keys = torch.arange(kv_len, device=mask.device)
    causal = keys[None, :] <= torch.arange(q_len, device=mask.device)[:, None] + (kv_len - q_len)
    expected = causal[None] & (keys[None, None, :] >= start[:, None, None])
    rows = expected.any(-1)  # fully padded query rows are free to differ
    if not torch.equal(mask & rows[..., None], expected):
        raise ValueError("mask is not causal + left padding")
    return start.to(torch.int32) if bool((start > 0).any()) else None


def dense_reason(state, attention_mask, batch: int, kv_len: int, kwargs) -> tuple[str | None, object]:
    """(why this call must run dense, or None; the left-padding start when it need not)."""
    if state.layer_index in state.config.dense_layers:
        return "dense layer", None
    if kwargs.get("sliding_window"):
        # Sliding-window layers (Gemma, Mistral) are already sparse; the method applies to the full layers.
        return "sliding-window layers keep their own window", None
    try:
        return None, padding_start(attention_mask, batch, kv_len)
    except ValueError as err:
        return str(err), None


def window_density(q_len: int, kv_len: int, window: int) -> float:
    """Fraction of the causal (query, key) pairs a sliding window of ``window`` keys reads (queries are the last
    ``q_len`` of ``kv_len`` positions)."""
    first, last = kv_len - q_len + 1, kv_len  # keys the first and the last query see causally

    def upto(n):  # 1 + 2 + ... + n
        return n * (n + 1) // 2

    causal = upto(last) - upto(first - 1)
    if window >= last:
        return 1.0
    if window < first:
        return q_len * window / causal
    return (upto(window) - upto(first - 1) + (last - window) * window) / causal


def must_run_dense(state, method: str, attention_mask, batch: int, kv_len: int, kwargs,
                   q_len: int) -> tuple[str | None, object]:
    """``dense_reason``, plus the warning and the density record a dense call owes: (reason or None, kv_start).
    A sliding-window layer records what its window reads, not 1.0, so a model's mean density stays what it reads."""
    reason, kv_start = dense_reason(state, attention_mask, batch, kv_len, kwargs)
    if reason is not None:
        if reason != "dense layer":
            # Python's default filter shows each distinct message once per call site.
            warnings.warn(f"patchattn {method}: {reason}; those calls run dense attention", stacklevel=3)
        window = kwargs.get("sliding_window")
        state.record(density=window_density(q_len, kv_len, window) if window else 1.0)
    return reason, kv_start


def run_block_sparse(module, query, key, value, attention_mask, *, scaling, select: BlockSelector,
                     static: bool, dropout=0.0, **kwargs):
    """Shared forward of every block-sparse method (transformers' signature; returns ``([B, Tq, Hq, D], None)``)."""
    state = module.patchattn
    config = state.config
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    reason, kv_start = must_run_dense(state, type(config).method, attention_mask, batch, kv_len, kwargs, q_len)
    if reason is not None:
        return dense_call(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    geometry = BlockGeometry(q_len, kv_len, config.block_size, config.block_size)
    kv_indices, kv_counts = block_lists(state, geometry, query, key, select, static)
    out = block_sparse_attention(
        query, key, value, kv_indices, kv_counts, block_q=geometry.block_q, block_k=geometry.block_k, causal=True,
        scale=scaling, softcap=kwargs.get("softcap"), kv_start=kv_start, backend=config.backend,
    )
    state.record(density=lambda: density_tensor(kv_counts, q_len, kv_len, geometry.block_q, geometry.block_k))
    return out.transpose(1, 2), None


def register_sparse_method(name: str, *, config: type[SparseConfig], select: BlockSelector, static: bool, paper: str,
                           doc: str, families: tuple[str, ...] = ("llm", "lvlm"),
                           patterns: tuple[str, ...] = ("causal-self",), make_state: Callable | None = None,
                           state_cls: type[SparseState] = SparseState) -> Callable:
    """Register block-sparse method ``name``: its block choice is ``select``; the rest is ``run_block_sparse``.

    ``static``: the selection depends on positions only, so its lists are cached per shape.  The selector and the
    flag are kept on the spec (``get_spec(name).select`` / ``.static``) for benchmarks and reports.  ``state_cls``:
    the method's typed state, a ``SparseState`` subclass (``make_state``, when given, builds it with its plan).
    Returns the attention function (transformers' signature).
    """
    if not issubclass(state_cls, SparseState):
        raise TypeError(f"sparse method {name!r}: state_cls must subclass SparseState, got {state_cls!r}")

    def forward(module, query, key, value, attention_mask, *, scaling=None, **kwargs):
        return run_block_sparse(module, query, key, value, attention_mask, scaling=scaling, select=select,
                                static=static, **kwargs)

    forward.__name__ = f"{name}_attention"
    forward.__doc__ = doc
    return register_method(name, config=config, category="sparse", families=families, patterns=patterns,
                           paper=paper, make_state=make_state, select=select, static=static,
                           state_cls=state_cls)(forward)


def block_lists(state, geometry: BlockGeometry, query, key, select: BlockSelector, static: bool):
    """Block lists for this call, with ``density`` mapped to the method's own fields at this length (_budget.py);
    static patterns are computed once per (shape, device) and cached."""
    cache_key = (geometry, query.device)
    kept = state.method_state
    if static and kept.static_blocks is not None and kept.static_key == cache_key:
        return kept.static_blocks
    with budget_applied(state, geometry):
        mask = select(geometry, query, key, state)
        blocks = mask if isinstance(mask, tuple) else mask_lists(state.config, geometry, mask, query.device)
    if static:
        # Only the latest shape is kept: decoding changes it every step.
        kept.static_key, kept.static_blocks = cache_key, blocks
    return blocks


def mask_lists(config, geometry: BlockGeometry, mask, device):
    """A selector's block mask -> block lists (with the dense last query block where the config asks for it)."""
    while mask.ndim < 4:
        mask = mask[None]
    if config.last_block_dense and geometry.n_q > 1:
        mask = mask.clone()
        mask[..., -1, :] = causal_allowed(geometry, device)[-1]
    # Decoding (one query block) sizes the lists by the method's bound: no host sync, so a decode step can be
    # captured in a CUDA graph.  Prefill sizes them to the longest row (one sync per call).
    width = decode_width(config, geometry) if geometry.n_q == 1 else None
    return blocks_from_mask(mask, width=width)


# Decode lists of the static patterns, by the host integers that fix them (they change once per key block, not per
# token) and device: a decode step then launches no kernel to build them (3-8 small ones otherwise; H200, eager
# streaming step at 128k: ~100 of 254 us, bench/decode/host_profile.py).  A few recent plans per device are kept.
_DECODE_LISTS: OrderedDict = OrderedDict()
DECODE_LISTS_KEPT = 64


def memo_decode_lists(plan: tuple, device, build: Callable[[], tuple]) -> tuple:
    """``build()``'s lists for this ``plan`` (every host value they depend on) on ``device``, built once and shared
    by every layer and step with the same plan.  The tensors are read-only to their users; nothing is stored while
    a CUDA graph is being captured (its tensors would live in the graph's memory pool)."""
    key = (plan, str(device))
    lists = _DECODE_LISTS.get(key)
    if lists is not None:
        _DECODE_LISTS.move_to_end(key)
        return lists
    lists = build()
    if not (torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()):
        _DECODE_LISTS[key] = lists
        while len(_DECODE_LISTS) > DECODE_LISTS_KEPT:
            _DECODE_LISTS.popitem(last=False)
    return lists


def row_lists(runs: tuple, width: int, device) -> tuple:
    """A static pattern's decode lists from one query block's runs (host integers: they are the plan), memoised."""
    return memo_decode_lists(("runs", runs, width), device, lambda: runs_lists(runs, width, device))


def decode_width(config, geometry: BlockGeometry) -> int:
    """Width of one query block's lists: the method's bound, clipped to the key blocks as ``blocks_from_mask`` does
    (selectors that build decode lists themselves use it so their lists equal the mask path's)."""
    return max(1, min(config.max_blocks_per_row(geometry.n_k), geometry.n_k))
