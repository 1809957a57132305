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

from ..config import READS_EVERYTHING, MethodConfig, covering_fields, option
from ..kernels.blocksparse import block_sparse_attention, blocks_from_mask, density_tensor
from ..kernels.dense import eager_attention, sdpa_attention
from ..masks import BlockGeometry, RowGeometry, Run, causal_allowed, runs_lists
from ..registry import register_method
from ..state import MethodState
from ._budget import DENSITY_HELP, budget_applied, check_density, check_density_fields
from ._rows import KeyBounds, PaddingError, clear_caches, padding_spans, real_blocks, row_starts, run_by_rows

# (geometry, query, key, state) -> bool block mask [B' or 1, H' (1, Hkv or Hq), NQ, NK], or ready block lists
# (kv_indices, kv_counts) when the method builds them directly (blocktopk while decoding).
BlockSelector = Callable[[BlockGeometry, torch.Tensor, torch.Tensor, object], "torch.Tensor | tuple"]
# (rows, query [B, Hq, 1, D], key [B, Hkv, capacity, D], state) -> (kv_indices [B, H', 1, W], kv_counts [B, H', 1]):
# a decode step's lists for rows of different lengths (device tensors), block ids counted from each row's first
# real key, built with static shapes and no host read.
RowsSelector = Callable[[RowGeometry, torch.Tensor, torch.Tensor, object], tuple]


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

    # What is kept between the calls of one sequence (reset for a new row group by ``_rows.fresh_copy``).
    CACHE_FIELDS: ClassVar[tuple[str, ...]] = ("static_key", "static_blocks", "row_states")
    # Whether decode steps over rows (``decode_rows``) keep device buffers between steps, which a static cache's
    # prefill then makes eagerly (``adapters.hf.warm_up_rows_decode``).
    DECODE_BUFFERS: ClassVar[bool] = False

    static_key: tuple | None = None
    static_blocks: tuple | None = None
    # A padded batch runs as groups of rows with the same real span; each group's own state, by (rows, start).
    row_states: dict = dataclasses.field(default_factory=dict)


def dense_call(module, query, key, value, attention_mask, *, scaling, dropout=0.0, **kwargs):
    """The model's own (SDPA / soft-capped eager) attention."""
    fn = eager_attention if kwargs.get("softcap") is not None else sdpa_attention
    return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def padding_start(attention_mask, batch: int, kv_len: int) -> torch.Tensor | None:
    """``[B]`` int32 first real key per row under padding (left, right or both); None when no row starts late.

    For the methods that take the whole batch in one call and only need to mask the left padding: a row's real
    queries never reach its right padding (causality).  Raises ``PaddingError`` (a ValueError) when the mask has
    another structure (sliding window, bidirectional image tokens), which a start per row cannot express.
    """
    if attention_mask is None:
        return None
    return row_starts(attention_mask, attention_mask.shape[2], kv_len)


def layer_dense_reason(state, kwargs) -> str | None:
    """Why this layer runs dense whatever the input (a dense layer, a sliding-window layer), or None."""
    if state.layer_index in state.config.dense_layers:
        return "dense layer"
    if kwargs.get("sliding_window"):
        # Sliding-window layers (Gemma, Mistral) are already sparse; the method applies to the full layers.
        return "sliding-window layers keep their own window"
    return None


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


def record_dense_call(state, method: str, reason: str, q_len: int, kv_len: int, kwargs) -> None:
    """The warning and the density record a dense call owes (a sliding-window layer records what its window reads,
    not 1.0, so a model's mean density stays what it reads)."""
    if reason != "dense layer":
        # Python's default filter shows each distinct message once per call site.
        warnings.warn(f"patchattn {method}: {reason}; those calls run dense attention", stacklevel=3)
    window = kwargs.get("sliding_window")
    state.record(density=window_density(q_len, kv_len, window) if window else 1.0)


def sparse_reason(state, attention_mask, q_len: int, kv_len: int, kwargs) -> tuple[str | None, object]:
    """(why this call must run dense, or None; the rows' real spans when the batch is padded, else None)."""
    reason = layer_dense_reason(state, kwargs)
    if reason is not None or attention_mask is None:  # no mask: no row is padded
        return reason, None
    return padding_reason(attention_mask, q_len, kv_len)


def padding_reason(attention_mask, q_len: int, kv_len: int) -> tuple[str | None, object]:
    """``sparse_reason`` of a layer that is not dense in itself: the rows' real spans (None: none padded), or why
    the mask's structure needs a dense call."""
    try:
        return None, padding_spans(attention_mask, q_len, kv_len)
    except PaddingError as err:
        return str(err), None


def run_block_sparse(module, query, key, value, attention_mask, *, scaling, select: BlockSelector,
                     static: bool, decode_rows: RowsSelector | None = None, dropout=0.0, key_bounds=None,
                     state=None, **kwargs):
    """Shared forward of every block-sparse method (transformers' signature; returns ``([B, Tq, Hq, D], None)``).

    A padded batch runs row group by row group (``_rows.run_by_rows``): each row reads the blocks it would read
    alone, whatever the padding of the others.  A decode step given ``key_bounds`` (the adapter does so for methods
    with a ``decode_rows`` selector) runs every row in one launch with no host read: ``run_rows_decode``.
    ``state``: the module's ``PatchState`` when the caller has it already (None: read from the module)."""
    state = module.patchattn if state is None else state
    q_len, kv_len = query.shape[2], key.shape[2]
    reason = layer_dense_reason(state, kwargs)  # sparse_reason's first half; its second only under a mask
    if key_bounds is not None:
        if reason is None or dense_decode_on_kernel(state, query, reason):
            rows = full_rows if reason is not None else decode_rows
            return run_rows_decode(state, query, key, value, key_bounds, scaling=scaling,
                                   softcap=kwargs.get("softcap"), decode_rows=rows), None
        record_dense_call(state, type(state.config).method, reason, q_len, kv_len, kwargs)
        return dense_call(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    spans = None
    if reason is None and attention_mask is not None:
        reason, spans = padding_reason(attention_mask, q_len, kv_len)
    if reason is not None and attention_mask is None and q_len == 1 and dense_decode_on_kernel(state, query, reason):
        return sparse_call(state, query, key, value, scaling=scaling, softcap=kwargs.get("softcap"),
                           select=full_decode_lists, static=False), None
    if reason is not None:
        record_dense_call(state, type(state.config).method, reason, q_len, kv_len, kwargs)
        return dense_call(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if q_len == kv_len:  # a new sequence: nothing kept from the previous one applies
        clear_caches(state.method_state)
    if spans is None:
        return sparse_call(state, query, key, value, scaling=scaling, softcap=kwargs.get("softcap"), select=select,
                           static=static), None

    def run(q, k, v):
        return sparse_call(state, q, k, v, scaling=scaling, softcap=kwargs.get("softcap"), select=select,
                           static=static)

    return run_by_rows(state, query, key, value, spans, run), None


def sparse_call(state, query, key, value, *, scaling, softcap, select: BlockSelector, static: bool) -> torch.Tensor:
    """One block-sparse kernel call on unpadded rows: ``[B, Tq, Hq, D]``."""
    config = state.config
    q_len, kv_len = query.shape[2], key.shape[2]
    geometry = BlockGeometry(q_len, kv_len, config.block_size, config.block_size)
    kv_indices, kv_counts = block_lists(state, geometry, query, key, select, static)
    out = block_sparse_attention(
        query, key, value, kv_indices, kv_counts, block_q=geometry.block_q, block_k=geometry.block_k, causal=True,
        scale=scaling, softcap=softcap, backend=config.backend,
    )
    if q_len == kv_len and q_len > 1:  # a prefill already waits for the host once: checking costs nothing more
        density = density_tensor(kv_counts, q_len, kv_len, geometry.block_q, geometry.block_k)
        state.record(density=density)
        warn_if_reads_everything(state, geometry, float(density))
    else:
        record_decode_density(state, lambda: density_tensor(kv_counts, q_len, kv_len, geometry.block_q,
                                                            geometry.block_k))
    return out.transpose(1, 2)


def record_decode_density(state, density: Callable) -> None:
    """A decode step's density, computed when read: the step launches no kernel for its statistics (~8 per layer,
    host time in an eager step).  Not recorded in a compiled step: its tensors belong to the graph, and a CUDA graph
    overwrites them at the next replay."""
    if not torch.compiler.is_compiling():
        state.record(density=density)


def run_rows_decode(state, query, key, value, bounds: KeyBounds, *, scaling, softcap,
                    decode_rows: RowsSelector) -> torch.Tensor:
    """A decode step over rows whose real keys are ``bounds`` (device tensors): the method's ``decode_rows`` lists
    count from each row's first real key, so every row reads what it would alone, in one launch, with no host read
    (the step compiles whole and replays in a CUDA graph).  ``[B, 1, Hq, D]``."""
    config = state.config
    rows = RowGeometry(bounds.lengths, key.shape[2], config.block_size, config.block_size, bounds.starts,
                       shared=bounds.shared)
    kv_indices, kv_counts = decode_rows(rows, query, key, state)
    out = block_sparse_attention(
        query, key, value, kv_indices, kv_counts, block_q=config.block_size, block_k=config.block_size, causal=True,
        scale=scaling, softcap=softcap, kv_start=bounds.starts, kv_end=bounds.ends, lists_from_start=True,
        backend=config.backend,
    )
    record_decode_density(state, rows_density(kv_counts, rows))
    return out.transpose(1, 2)


def dense_decode_on_kernel(state, query, reason: str) -> bool:
    """Whether a dense layer's decode step runs on the split-K kernel with every block listed (same attention):
    on a GPU, SDPA's cuDNN path plans each new key length on the host, ~5 ms per call in an eager step on the H200
    (bench/generate/RESULTS.md), while the kernel's lists for a full row are built once per key block."""
    return (reason == "dense layer" and query.is_cuda and query.shape[2] == 1
            and state.config.backend in ("auto", "triton"))


def full_decode_lists(geometry: BlockGeometry, query, key, state):
    """Every key block, as one decode row's lists (memoised per block count)."""
    return row_lists((Run(0, geometry.n_k),), geometry.n_k, query.device)


def full_rows(rows: RowGeometry, query, key, state):
    """Every key block of each row (``decode_rows`` of a dense layer)."""
    return rows.once(("full", rows.block_k, rows.n_k), lambda: real_blocks(rows.lengths, rows.capacity, rows.block_k))


def rows_density(kv_counts: torch.Tensor, rows: RowGeometry):
    """The mean fraction of each row's key blocks read (evaluated when read: no host sync in the step)."""
    blocks = rows.row_blocks().reshape(-1, 1, 1).clamp(min=1)

    def density():
        return (kv_counts.float() / blocks).mean()

    return density


def warn_if_reads_everything(state, geometry: BlockGeometry, density: float) -> None:
    """Warn once per model when a sparse method's selection keeps every causal block (the input is shorter than its
    pattern, or below its ``min_seq_len``): it then costs what dense costs, and a user asked for sparse."""
    warned = state.context.extras.setdefault("warned_reads_everything", set())
    method = type(state.config).method
    if density < READS_EVERYTHING or method in warned:
        return
    warned.add(method)
    warnings.warn(f"patchattn {method}: {reads_everything_reason(state.config, geometry.kv_len)}", stacklevel=5)


def reads_everything_reason(config, tokens: int) -> str:
    """Why a selection keeps every block at ``tokens`` tokens, and what makes it sparse."""
    fields = covering_fields(config, tokens)
    if fields:
        why = "; ".join(text for text, _ in fields)
        return (f"at {tokens} tokens the pattern reads every block, so these calls cost what dense attention costs "
                f"({why}); it is sparse on inputs longer than {max(span for _, span in fields)} tokens or with "
                "smaller values of those fields")
    if tokens <= config.block_size:
        return (f"{tokens} tokens fit in one block (block_size={config.block_size}), so these calls run dense; "
                "a smaller block_size or a longer input makes them sparse")
    return f"at {tokens} tokens the selection kept every block, so these calls cost what dense attention costs"


DIT_PATTERNS = ("noncausal-self", "noncausal-cross")  # what a DiT's attention modules call


def register_sparse_method(name: str, *, config: type[SparseConfig], select: BlockSelector, static: bool, paper: str,
                           doc: str, families: tuple[str, ...] = ("llm", "lvlm"),
                           patterns: tuple[str, ...] = ("causal-self",), make_state: Callable | None = None,
                           state_cls: type[SparseState] = SparseState,
                           decode_rows: RowsSelector | None = None, dit_forward: Callable | None = None) -> Callable:
    """Register block-sparse method ``name``: its block choice is ``select``; the rest is ``run_block_sparse``.

    ``static``: the selection depends on positions only, so its lists are cached per shape.  The selector and the
    flag are kept on the spec (``get_spec(name).select`` / ``.static``) for benchmarks and reports.  ``state_cls``:
    the method's typed state, a ``SparseState`` subclass (``make_state``, when given, builds it with its plan).
    ``decode_rows``: the method's decode step on the device for rows of different lengths (``RowsSelector``); with
    it, a decode step with a mask (a static cache, a padded batch) needs no host read.  ``dit_forward``: the
    method's attention function for diffusion transformers (non-causal, on the latent grid); with it the method is
    registered for the ``dit`` family too.
    Returns the attention function (transformers' signature).
    """
    if not issubclass(state_cls, SparseState):
        raise TypeError(f"sparse method {name!r}: state_cls must subclass SparseState, got {state_cls!r}")

    def forward(module, query, key, value, attention_mask, *, scaling=None, **kwargs):
        if dit_forward is not None and module.patchattn.role == "dit":
            return dit_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        return run_block_sparse(module, query, key, value, attention_mask, scaling=scaling, select=select,
                                static=static, decode_rows=decode_rows, **kwargs)

    if dit_forward is not None:
        families = (*families, "dit")
        patterns = (*patterns, *(p for p in DIT_PATTERNS if p not in patterns))

    forward.__name__ = f"{name}_attention"
    forward.__doc__ = doc
    return register_method(name, config=config, category="sparse", families=families, patterns=patterns,
                           paper=paper, make_state=make_state, select=select, static=static,
                           state_cls=state_cls, key_bounds=decode_rows is not None)(forward)


def block_lists(state, geometry: BlockGeometry, query, key, select: BlockSelector, static: bool):
    """Block lists for this call, with ``density`` mapped to the method's own fields at this length (_budget.py);
    static patterns are computed once per (shape, device) and cached."""
    prompt = state.context.prefill_tokens
    # The key length first: a decode step's differs from the last call's there, so the dataclass's own (Python)
    # ``__eq__`` does not run in every layer of every step.
    cache_key = (geometry.kv_len, geometry, query.device, prompt)
    kept = state.method_state
    if static and kept.static_blocks is not None and kept.static_key == cache_key:
        return kept.static_blocks
    config = state.config
    dense_last = config.last_block_dense and reads_last_block_whole(config, geometry, prompt)
    if dense_last and geometry.n_q == 1:  # a context-parallel chunk of one block, the prompt's last: every key
        return blocks_from_mask(causal_allowed(geometry, query.device)[None, None])
    if getattr(config, "density", None) is None:  # no budget to resolve: the config is this call's (_budget.py)
        blocks = select_lists(state, geometry, query, key, select, dense_last)
    else:
        with budget_applied(state, prompt_geometry(geometry, prompt)):
            blocks = select_lists(state, geometry, query, key, select, dense_last)
    if static:
        # Only the latest shape is kept: decoding changes it every step.
        kept.static_key, kept.static_blocks = cache_key, blocks
    return blocks


def select_lists(state, geometry: BlockGeometry, query, key, select: BlockSelector, dense_last: bool):
    """The selector's lists for this call (its mask made into lists where it returns one)."""
    mask = select(geometry, query, key, state)
    return mask if isinstance(mask, tuple) else mask_lists(state.config, geometry, mask, query.device, dense_last)


def reads_last_block_whole(config, geometry: BlockGeometry, prompt: int | None = None) -> bool:
    """Whether this call's last query block reads every key (``last_block_dense``): the prompt's last block of a
    multi-block prefill.  ``prompt``: the whole prompt's length when the call is one context-parallel chunk of it
    (``PatchContext.prefill_tokens``); a chunk ending before the prompt's end does not hold that block."""
    if not config.last_block_dense:
        return False
    if prompt is None:
        return geometry.n_q > 1
    return geometry.kv_len == prompt and prompt > geometry.block_q


def prompt_geometry(geometry: BlockGeometry, prompt: int | None) -> BlockGeometry:
    """The geometry ``density`` resolves at: the call's own, or the whole prompt's for a context-parallel chunk."""
    if prompt is None:
        return geometry
    return BlockGeometry(prompt, prompt, geometry.block_q, geometry.block_k)


def mask_lists(config, geometry: BlockGeometry, mask, device, dense_last: bool | None = None):
    """A selector's block mask -> block lists (with the dense last query block where the config asks for it;
    ``dense_last`` overrides that choice, as ``reads_last_block_whole`` makes it for a context-parallel chunk)."""
    while mask.ndim < 4:
        mask = mask[None]
    if dense_last is None:
        dense_last = reads_last_block_whole(config, geometry)
    if dense_last:
        mask = mask.clone()
        mask[..., -1, :] = causal_allowed(geometry, device)[-1]
    # Decoding (one query block) sizes the lists by the method's bound: no host sync, so a decode step can be
    # captured in a CUDA graph.  Prefill sizes them to the longest row (one sync per call).
    width = decode_width(config, geometry) if geometry.n_q == 1 and not dense_last else None
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
