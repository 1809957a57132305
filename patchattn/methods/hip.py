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
top-k is computed exactly for the single query row (cheaper than the tree on a GPU, see ``_decode_lists``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import option
from ..kernels.blockselect import max_list_width
from ..masks import BlockGeometry, causal_allowed
from ..registry import register_method
from ._sparse import LAST_BLOCK_DENSE_HELP, SparseConfig, sparse_forward
from .blocktopk import block_means, decode_lists, forced_blocks, key_block_means


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
    dense_layers: list = option([0], "layer indices kept dense (paper: the first layers)", min=0)

    DENSE_EQUIVALENT: ClassVar[dict] = {"top_k": 1 << 30, "dense_layers": []}

    def max_blocks_per_row(self, n_k: int) -> int:
        return max_list_width(n_k, self.top_k, self.sink_blocks, self.local_blocks)


def _initial_segments(diagonal: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[NQ, k]`` start/end (exclusive) of ``k`` near-equal segments of blocks ``[0, diagonal]``."""
    length = (diagonal + 1).float()[:, None]
    cuts = torch.arange(k + 1, device=diagonal.device).float()[None] / k
    bounds = torch.floor(cuts * length).long()
    return bounds[:, :-1], bounds[:, 1:]


def tree_search(q_rows: torch.Tensor, k_means: torch.Tensor, diagonal: torch.Tensor, k: int) -> torch.Tensor:
    """Hierarchical top-k over key blocks.

    Args:
        q_rows: ``[B, H, NQ, R, D]`` the query rows of each query block (and GQA group) a segment is scored
            against; its score is the best row's (``R = 1``: one pooled row).
        k_means: ``[B, H, NK, D]`` mean key per key block.
        diagonal: ``[NQ]`` last key block each query block may read.
        k: number of blocks to keep.

    Returns:
        bool ``[B, H, NQ, NK]`` with at most ``k`` blocks per row.
    """
    b, h, n_q = q_rows.shape[:3]
    n_k = k_means.shape[2]
    start, end = _initial_segments(diagonal, k)
    start = start.expand(b, h, n_q, k).clone()
    end = end.expand(b, h, n_q, k).clone()
    # Prefix sums of the block means give any segment's mean key in O(1): its representative.
    prefix = torch.nn.functional.pad(k_means.cumsum(dim=2, dtype=torch.float32), (0, 0, 1, 0))
    # The longest initial segment has ceil(n_k / k) blocks and every round halves it (rounding up): the number
    # of rounds is known on the host, so the search needs no device-to-host sync.
    for _ in range(_rounds(-(-n_k // k))):
        mid = torch.where(end - start > 1, (start + end) // 2, end)
        start = torch.cat([start, mid], dim=-1)  # left halves then right halves
        end = torch.cat([mid, end], dim=-1)
        scores = _segment_scores(q_rows, prefix, start, end)
        best = scores.topk(k, dim=-1).indices
        start, end = torch.gather(start, -1, best), torch.gather(end, -1, best)
    chosen = torch.zeros(b, h, n_q, n_k, dtype=torch.bool, device=q_rows.device)
    valid = end > start
    chosen.scatter_(-1, start.clamp(0, n_k - 1), valid)
    return chosen


def _rounds(longest: int) -> int:
    rounds = 0
    while longest > 1:
        longest, rounds = -(-longest // 2), rounds + 1
    return rounds


def _segment_scores(q_rows, prefix, start, end) -> torch.Tensor:
    """``[B, H, NQ, S]`` score of each segment: best query row · the segment's mean key (-inf if empty)."""
    b, h, n_q, n_seg = start.shape
    d = prefix.shape[-1]

    def gather(index):
        return torch.gather(prefix, 2, index.reshape(b, h, -1, 1).expand(-1, -1, -1, d)).view(b, h, n_q, n_seg, d)

    length = (end - start).clamp(min=1)[..., None]
    means = (gather(end) - gather(start)) / length
    scores = (q_rows.to(means.dtype) @ means.transpose(-1, -2)).amax(dim=3)  # [B, H, NQ, R, S] -> best row
    return scores.masked_fill(end <= start, float("-inf"))


def query_rows(query: torch.Tensor, block: int, kv_heads: int, per_head: bool, score: str) -> torch.Tensor:
    """``[B, H, NQ, R, D]`` the rows each query block's segments are scored against (H: query or KV heads)."""
    b, hq, t, d = query.shape
    groups = hq // kv_heads
    if score == "mean":
        rows = block_means(query, block)[:, :, :, None]  # [B, Hq, NQ, 1, D]
    else:
        n_q = -(-t // block)
        if n_q == 1:  # decoding: the few rows as they are
            rows = query.float()[:, :, None]
        else:
            # Pad the last block by repeating its last row: the max over rows is unchanged.
            rows = torch.cat([query, query[:, :, -1:].expand(-1, -1, n_q * block - t, -1)], dim=2).float()
            rows = rows.view(b, hq, n_q, block, d)
    if per_head:
        return rows
    grouped = rows.view(b, kv_heads, groups, *rows.shape[2:])
    if score == "mean":
        return grouped.mean(dim=2)
    return grouped.transpose(2, 3).reshape(b, kv_heads, rows.shape[2], groups * rows.shape[3], d)


def select_hip(g: BlockGeometry, query, key, state):
    config = state.config
    if g.q_len == 1:
        return _decode_lists(g, query, key, state)
    state.cache.pop("hip_decode", None)
    allowed = causal_allowed(g, query.device)
    forced = forced_blocks(g, config.sink_blocks, config.local_blocks, query.device) & allowed
    groups = query.shape[1] // key.shape[1]
    q_rows = query_rows(query, g.block_q, key.shape[1], config.per_head, config.score)
    k_means = key_block_means(state, key, g.block_k, g.q_len)
    if config.per_head:
        k_means = k_means.repeat_interleave(groups, dim=1)
    k = min(config.top_k, g.n_k)
    chosen = tree_search(q_rows, k_means, g.diagonal_block(query.device), k) & allowed
    return chosen | forced


def _decode_lists(g: BlockGeometry, query, key, state):
    """Decoding: block lists re-selected every ``refresh_interval`` steps and reused in between.

    The search target (the top-k blocks by segment representative) is computed exactly for the one query row: that
    is two launches on the GPU (``kernels.blockselect``), where the tree takes ~8 rounds of ~10.  The lists
    are reused as they are while the cache stays within the same blocks (the newest block grows in place and is
    read as a local block); a new block starts a fresh selection, so its tokens are never missed.
    """
    config = state.config
    saved = state.cache.get("hip_decode")
    if saved is not None and saved["age"] + 1 < config.refresh_interval and saved["n_k"] == g.n_k:
        saved["age"] += 1
        return saved["lists"]
    lists = decode_lists(query, key, state)
    state.cache["hip_decode"] = {"lists": lists, "age": 0, "n_k": g.n_k}
    return lists


hip_attention = register_method(
    "hip",
    config=HipConfig,
    category="sparse",
    families=("llm", "lvlm"),
    patterns=("causal-self",),
    paper="Lee et al., A Training-free Sub-quadratic Cost Transformer Model Serving Framework with Hierarchically "
    "Pruned Attention (HiP, ICLR 2025), arXiv 2406.09827",
)(
    sparse_forward("hip", select_hip, static=False, doc="Hierarchical top-k block search per query block, plus sink and local blocks.")
)
