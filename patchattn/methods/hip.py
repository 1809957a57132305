"""``hip`` — HiP attention: hierarchically pruned top-k block selection, training-free.

For each query block, HiP estimates its top-k keys without scoring all of them: start from ``top_k`` equal
segments of the causal past, split every segment in two, score each half by one representative key against the
query block, keep the ``top_k`` best halves, and repeat until the segments are single blocks — about
``log2(n / k)`` rounds of ``2k`` scores each, O(n log n) overall instead of O(n^2).

Deviations from the paper (Lee et al., ICLR 2025), documented: the search runs at key-*block* granularity
(``block_size`` 64, the unit our block-sparse kernel reads) rather than 2-token key blocks; a segment's
representative is its mean key (the mean of its blocks' mean-pooled keys, O(1) from prefix sums; a single
middle key misses peaks that straddle a split), scored against the query block's best query row (``score="max"``,
as HiP scores a branch by its best query; ``"mean"`` uses the block's mean query, cheaper but it blurs the rows
that look for one needle), per head by default (``per_head=False`` shares one search per GQA group so it reads
each KV block once); sink and local blocks are always read (as in
InfiniteHiP); the first ``dense_layers`` stay dense (paper: first layers dense); during decoding the selection is
refreshed every ``refresh_interval`` steps (paper: 8) and whenever a new key block starts; at a refresh the
top-k is computed exactly for the single query row (cheaper than the tree on a GPU, see ``_decode_lists``).  A decode
step with a mask (a static cache, a padded batch) runs on the device (``decode_hip_rows``): it selects every step and
each row keeps its previous lists until its own refresh, so the step has static shapes and compiles whole.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import option
from ..kernels.blockselect import best_query_rows, max_list_width, prefill_tree_search, tree_search_torch
from ..masks import BlockGeometry, causal_allowed
from ._budget import budget_applied, capped_rows, closest_budget, pattern_density
from ._shared import (
    KeyMeansState,
    block_means,
    decode_lists,
    decode_rows_lists,
    forced_blocks,
    key_block_means,
    mark_row_means_stale,
)
from ._sparse import LAST_BLOCK_DENSE_HELP, SparseConfig, register_sparse_method


@dataclass(kw_only=True)
class HipConfig(SparseConfig):
    top_k: int = option(10, "key blocks kept per query block by the tree search (paper: k=512 tokens)", min=1)
    sink_blocks: int = option(1, "initial blocks always read", min=0)
    local_blocks: int = option(2, "nearest blocks always read (sliding window)", min=1)
    per_head: bool = option(True, "search per query head (as the paper) instead of once per GQA group")
    last_block_dense: bool = option(True, LAST_BLOCK_DENSE_HELP)
    refresh_interval: int = option(8, "decode steps between re-running the search (paper: 8)", min=1)
    score: str = option("max", "segment score: 'max' (best query row of the block . segment mean key, as the paper) "
                        "or 'mean' (mean query of the block . segment mean key)", choices=("mean", "max"))
    dense_layers: list = option([0], "layer indices kept dense (paper: the first layers)", min=0, index="layer")
    fused_search: bool = option(True, "prefill search in one Triton kernel (kernels/blockselect) on the triton "
                                "backend, score='max'; same segments and scores as the torch search")

    DENSE_EQUIVALENT: ClassVar[dict] = {"top_k": 1 << 30, "dense_layers": []}
    DENSITY_FIELDS: ClassVar[tuple] = ("top_k",)

    def fields_for_density(self, density: float, geometry: BlockGeometry) -> dict:
        """The top-k whose rows read ``density``: row ``i`` reads ``min(i + 1, sinks + local + top_k)`` blocks at most (the search may pick a sink or local block again: the target is a ceiling), the
        last one all with ``last_block_dense``; closed form."""
        n, forced = geometry.n_k, self.sink_blocks + self.local_blocks

        def reads(k):
            return pattern_density(capped_rows(n, forced + k), min(n, forced + k), n, self.last_block_dense)

        # Full density: a search as wide as the past picks every block (the bound above would leave room for overlap).
        return {"top_k": n if density >= 1.0 else closest_budget(reads, density, 1, n)}

    def max_blocks_per_row(self, n_k: int) -> int:
        return max_list_width(n_k, self.top_k, self.sink_blocks, self.local_blocks)


@dataclass
class HipDecode:
    """Decode lists kept between refreshes: reused while ``age + 1 < refresh_interval`` and the cache stays within
    ``n_k`` blocks."""

    lists: tuple
    age: int
    n_k: int


@dataclass
class HipRowsDecode:
    """``HipDecode`` per row, for decode steps over rows of different lengths (``decode_rows``), in device buffers
    updated in place (a compiled step keeps no graph output across steps): the lists in use ``[B, H, 1, W]`` and
    their counts ``[B, H, 1]``, each row's steps since its last refresh and its blocks then (``[B]`` int32).  Set up
    on the first row step of a sequence, with ``_shared.RowMeans`` (the same ``built`` rule)."""

    lists: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    age: torch.Tensor | None = None
    blocks: torch.Tensor | None = None


@dataclass
class HipState(KeyMeansState):
    """The compressed key cache, and the decode lists of the latest search (``rows_decode``: per row, shared with
    the row groups' copies as ``row_means`` is)."""

    CACHE_FIELDS: ClassVar[tuple[str, ...]] = (*KeyMeansState.CACHE_FIELDS, "decode")

    decode: HipDecode | None = None
    rows_decode: HipRowsDecode = dataclasses.field(default_factory=HipRowsDecode)


def query_rows(query: torch.Tensor, block: int, kv_heads: int, per_head: bool, score: str) -> torch.Tensor:
    """``[B, H, NQ, R, D]`` the rows each query block's segments are scored against (H: query or KV heads):
    every row of the block ('max', the kernel's ``best_query_rows``) or the block's mean row ('mean')."""
    if score != "mean":
        return best_query_rows(query, block, kv_heads, per_head)
    rows = block_means(query, block)[:, :, :, None]  # [B, Hq, NQ, 1, D]
    if per_head:
        return rows
    b, hq = query.shape[:2]
    return rows.view(b, kv_heads, hq // kv_heads, *rows.shape[2:]).mean(dim=2)


def select_hip(g: BlockGeometry, query, key, state):
    config = state.config
    mark_row_means_stale(state)
    if g.q_len == 1:
        return _decode_lists(g, query, key, state)
    state.method_state.decode = None
    allowed = causal_allowed(g, query.device)
    forced = forced_blocks(g, config.sink_blocks, config.local_blocks, query.device) & allowed
    k_means = key_block_means(state, key, g.block_k, g.q_len)
    k = min(config.top_k, g.n_k)
    if config.score == "max":
        chosen = prefill_tree_search(query, k_means, block_q=g.block_q, block_k=g.block_k, kv_len=g.kv_len, k=k,
                                     per_head=config.per_head, backend=config.backend if config.fused_search else "torch")
    else:
        q_rows = query_rows(query, g.block_q, key.shape[1], config.per_head, config.score)
        if config.per_head:
            k_means = k_means.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        chosen = tree_search_torch(q_rows, k_means, g.diagonal_block(query.device), k, score_dtype=query.dtype)
    return (chosen & allowed) | forced


def _decode_lists(g: BlockGeometry, query, key, state):
    """Decoding: block lists re-selected every ``refresh_interval`` steps and reused in between.

    The search target (the top-k blocks by segment representative) is computed exactly for the one query row: that
    is two launches on the GPU (``kernels.blockselect``), where the tree takes ~8 rounds of ~10.  The lists
    are reused as they are while the cache stays within the same blocks (the newest block grows in place and is
    read as a local block); a new block starts a fresh selection, so its tokens are never missed.
    """
    config = state.config
    saved = state.method_state.decode
    if saved is not None and saved.age + 1 < config.refresh_interval and saved.n_k == g.n_k:
        saved.age += 1
        return saved.lists
    lists = decode_lists(query, key, state)
    state.method_state.decode = HipDecode(lists, 0, g.n_k)
    return lists


def decode_hip_rows(rows, query, key, state):
    """``_decode_lists`` over rows of different lengths (a static cache, a padded batch), on the device: every step
    selects (static shapes: no host-side skip), and each row keeps its previous lists while its age is below
    ``refresh_interval`` and it has not started a block, exactly as the row alone.  ``density`` is resolved at the
    cache's capacity."""
    with budget_applied(state, rows.geometry()):
        was_built = state.method_state.row_means.built
        idx, counts = decode_rows_lists(rows, query, key, state)
    kept = state.method_state.rows_decode
    blocks = rows.row_blocks().reshape(-1).to(torch.int32)
    if not was_built or not _rows_decode_fits(kept, idx):  # a new sequence (or shape): every row selects afresh
        _start_rows_decode(kept, idx, counts, blocks)
        return idx, counts
    if kept.lists.shape[-1] < idx.shape[-1]:  # a growing (default) cache widened the lists
        kept.lists = torch.nn.functional.pad(kept.lists, (0, idx.shape[-1] - kept.lists.shape[-1]))
    reuse = (kept.age + 1 < state.config.refresh_interval) & (kept.blocks == blocks)  # [B]
    idx = torch.where(reuse.reshape(-1, 1, 1, 1), kept.lists, idx)
    counts = torch.where(reuse.reshape(-1, 1, 1), kept.counts, counts)
    kept.lists.copy_(idx)
    kept.counts.copy_(counts)
    kept.age.copy_(torch.where(reuse, kept.age + 1, 0))
    kept.blocks.copy_(blocks)
    return idx, counts


def _rows_decode_fits(kept: HipRowsDecode, idx: torch.Tensor) -> bool:
    return (kept.lists is not None and kept.lists.device == idx.device and kept.lists.shape[:3] == idx.shape[:3]
            and kept.lists.shape[-1] <= idx.shape[-1])


def _start_rows_decode(kept: HipRowsDecode, idx, counts, blocks) -> None:
    """The first row step of a sequence: its lists fill the buffers (in place when they have this shape)."""
    if (kept.lists is not None and kept.lists.device == idx.device and kept.lists.shape == idx.shape
            and kept.counts.shape == counts.shape and kept.age.shape == blocks.shape):
        kept.lists.copy_(idx)
        kept.counts.copy_(counts)
        kept.age.zero_()
        kept.blocks.copy_(blocks)
        return
    kept.lists, kept.counts = idx.clone(), counts.clone()
    kept.age, kept.blocks = torch.zeros_like(blocks), blocks.clone()


hip_attention = register_sparse_method(
    "hip",
    config=HipConfig,
    paper="Lee et al., A Training-free Sub-quadratic Cost Transformer Model Serving Framework with Hierarchically "
    "Pruned Attention (HiP, ICLR 2025), arXiv 2406.09827",
    select=select_hip,
    decode_rows=decode_hip_rows,
    state_cls=HipState,
    static=False,
    doc="Hierarchical top-k block search per query block, plus sink and local blocks.",
)
