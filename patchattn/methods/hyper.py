"""``hyper`` — HyperAttention's sortLSH + uniform sampling, as a block selection for the block-sparse engine.

HyperAttention (Han et al., "HyperAttention: Long-context Attention in Near-Linear Time", ICLR 2024,
arXiv 2310.05869) hashes queries and keys with angular LSH (``lsh_num_projs`` random hyperplanes; bucket ids in
Hamming order, so neighbouring buckets differ in one bit), sorts both by bucket, computes exact attention on the
block diagonal of the sorted matrix (each query sees the ``bucket_keys`` keys around its own bucket in sorted
order) and adds ``sample_size`` uniformly sampled keys, reweighted by n/m, for the residual mass.

Our kernel cannot reorder tokens, so the same selection is expressed as *which key blocks each query block reads*:
for each query block, count how many of its queries' sorted-range keys fall in each key block (bucket histograms:
``[NQ, buckets] @ overlap @ [buckets, NK]``, keys of a bucket cut by the range counted in proportion), keep the
``lsh_blocks`` key blocks with the largest counts, add ``ceil(sample_size / block_size)`` uniformly sampled blocks
of the causal past, plus the sink and local blocks.  Differences from the paper, precisely:

* block granularity: whole 64-key blocks are read, not the exact colliding keys, and only the best ``lsh_blocks``;
* sampled keys are whole blocks and are **not** reweighted by n/m (the kernel's ``col_bias`` could carry
  ``log(n/m)``, but a column may be sampled for one query block and exact for another, and the runner passes none);
* causality is the causal block mask plus always-read sink/local blocks, not the paper's recursive halving (whose
  diagonal blocks below ``min_seq_len`` are exact, like our local blocks);
* the paper's hash ``perm[code]`` is replaced by each code's rank in the reflected Gray sequence, which is the
  ordering in which adjacent buckets differ in one bit;
* the LSH hyperplanes are drawn from ``seed + layer index`` (kept in the typed state, ``HyperState``, not in
  ``state_dict``), and sampled blocks from the same seed, so a run is reproducible and decoding keeps its samples.

Below ``min_seq_len`` keys (paper: 4096) a call reads every block (exact attention), as the paper.

Decode steps with a mask (a static cache, a padded batch) keep each row's key bucket counts (``KeyBuckets``) and run
on the device with ``ties="lowest"`` (``decode_hyper_rows``: they compile whole); with the default ``ties="topk"``
(torch's top-k order among equal LSH scores, which depends on the row's width: what the pinned outputs use) each row
is selected alone on the host.  A batch of one row on the host path (the default cache's decode steps) keeps its key
blocks' bucket histogram between calls (``KeyHistogram``): a step hashes only the key block that gained a key, not
the whole cache (design note 51).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import option
from ..kernels.blockselect import forced_decode_blocks
from ..kernels.blocksparse import blocks_from_mask
from ..masks import BlockGeometry, RowGeometry, causal_allowed
from ._budget import budget_applied, capped_rows, closest_budget, pattern_density
from ._shared import forced_blocks
from ._sparse import SparseConfig, SparseState, decode_width, register_sparse_method

SEED_STRIDE = 1_000_003  # separates the per-layer streams of different seeds


@dataclass(kw_only=True)
class HyperConfig(SparseConfig):
    lsh_num_projs: int = option(7, "angular LSH hyperplanes: 2^p buckets (paper: 7)", min=1, max=16)
    bucket_keys: int = option(256, "keys around a query's bucket in sorted order it may read (paper block: 256)",
                              min=1)
    lsh_blocks: int = option(8, "key blocks kept per query block, ranked by sorted-range keys they hold", min=0)
    sample_size: int = option(256, "uniformly sampled keys (paper: 256), read as whole blocks, not reweighted",
                              min=0)
    sink_blocks: int = option(1, "initial blocks always read", min=0)
    local_blocks: int = option(2, "nearest blocks always read (includes the diagonal block)", min=1)
    min_seq_len: int = option(4096, "calls with fewer keys run exact attention (paper: 4096)", min=0)
    seed: int = option(0, "seed of the LSH hyperplanes and the sampled blocks (per layer: seed + layer)", min=0)
    ties: str = option("topk", "order of equal LSH block scores (frequent: counts of whole keys): 'topk' (torch's "
                       "top-k order, which depends on the row's width, so a decode step over a static cache or a padded "
                       "batch selects each row on the host: no fullgraph compile) or 'lowest' (lowest block first at "
                       "any width: those decode steps run on the device, compile whole and replay in a CUDA graph)",
                       choices=("topk", "lowest"))

    DENSE_EQUIVALENT: ClassVar[dict] = {"min_seq_len": 1 << 30}
    DENSITY_FIELDS: ClassVar[tuple] = ("lsh_blocks", "sample_size", "min_seq_len")

    def fields_for_density(self, density: float, geometry: BlockGeometry) -> dict:
        """``k`` blocks beyond the sink and local ones, two thirds by LSH and one third sampled (the defaults' 8 : 4 at
        64-token blocks), so row ``i`` reads at most ``min(i + 1, sinks + local + k)`` blocks (fewer where LSH finds
        fewer colliding blocks); closed form.  ``min_seq_len`` drops to 0: a set density holds at every length, and
        density 1.0 is exact attention."""
        if density >= 1.0:
            return {"min_seq_len": 1 << 30}
        n, forced = geometry.n_k, self.sink_blocks + self.local_blocks

        def reads(k):
            return pattern_density(capped_rows(n, forced + k), min(n, forced + k), n, self.last_block_dense)

        k = closest_budget(reads, density, 0, n)
        return {"lsh_blocks": k - k // 3, "sample_size": (k // 3) * geometry.block_k, "min_seq_len": 0}


@dataclass
class KeyBuckets:
    """The bucket histogram of every key block of each row, for decode steps over rows of different lengths
    (``decode_rows``): ``counts`` ``[B, Hkv, NK, 2^p]`` fp32, block ``j`` of row ``b`` being keys ``starts[b] +
    j * block`` ..., NK from the cache's capacity.  Built from the keys on the first such step of a sequence (in
    place when a buffer of that shape is left), then each step recomputes each row's newest block in place (a compiled
    step keeps no graph output across steps); ``built``: a host flag, cleared by any call on the host path."""

    counts: torch.Tensor | None = None
    built: bool = False


@dataclass
class KeyHistogram:
    """The bucket histogram of every key block of a one-row batch (``counts`` ``[1, Hkv, NK, 2^p]`` fp32: exact
    integer counts, what ``bucket_histogram`` gives for these keys), kept by a host-path call for the next one:
    ``tokens`` keys counted, in blocks of ``block``, hashed with ``projections`` (that tensor, by identity)."""

    counts: torch.Tensor
    tokens: int
    block: int
    projections: torch.Tensor


@dataclass
class HyperState(SparseState):
    """This layer's LSH hyperplanes (``[D, p]``, drawn once from ``seed + layer``), the sampling priorities
    (``[H, NK]``) with the ``(n_k, heads, device)`` they were drawn for, the row decode's key buckets (not a
    cache field: one object shared with the row groups' copies, so their host calls mark it stale too) and the host
    path's key histogram (a cache field: cleared by a prefill, one per row group)."""

    CACHE_FIELDS: ClassVar[tuple[str, ...]] = (*SparseState.CACHE_FIELDS, "key_hist")
    DECODE_BUFFERS: ClassVar[bool] = True
    DEVICE_FIELDS: ClassVar[tuple[str, ...]] = ("projections",)

    projections: torch.Tensor | None = None
    priority_shape: tuple | None = None
    priority: torch.Tensor | None = None
    key_buckets: KeyBuckets = dataclasses.field(default_factory=KeyBuckets)
    key_hist: KeyHistogram | None = None


# ---- sortLSH -----------------------------------------------------------------------------------------------------
def gray_rank(num_projs: int, device="cpu") -> torch.Tensor:
    """``[2^p]`` position of each binary code in the reflected Gray sequence (adjacent positions differ in one bit),
    made once per device (not copied there every call: a host copy cannot be captured in a CUDA graph); a constant
    of the graph inside a compiled step."""
    if torch.compiler.is_compiling():
        return _gray_rank_constant(num_projs, str(device))
    return _gray_rank(num_projs, str(device))


@torch.compiler.assume_constant_result
def _gray_rank_constant(num_projs: int, device: str) -> torch.Tensor:
    return _gray_rank(num_projs, device)


@functools.lru_cache(maxsize=16)
def _gray_rank(num_projs: int, device: str) -> torch.Tensor:
    n = 1 << num_projs
    codes = torch.arange(n)
    rank = torch.empty(n, dtype=torch.long)
    rank[codes ^ (codes >> 1)] = codes
    return rank.to(device)


def lsh_projections(state, dim: int, device) -> torch.Tensor:
    """``[D, p]`` Gaussian hyperplanes of this layer, drawn once from ``seed + layer`` and kept in the state."""
    config, kept = state.config, state.method_state
    proj = kept.projections
    if proj is None or tuple(proj.shape) != (dim, config.lsh_num_projs):
        gen = torch.Generator().manual_seed(config.seed * SEED_STRIDE + state.layer_index)
        proj = kept.projections = torch.randn(dim, config.lsh_num_projs, generator=gen)
    if proj.device != torch.device(device):  # kept on the queries' device: no copy per call (nor in a CUDA graph)
        proj = kept.projections = proj.to(device)
    return proj


def lsh_buckets(x: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, D]`` -> ``[B, H, T]`` Hamming-ordered bucket of each vector (sign pattern of its projections)."""
    bits = (x.float() @ proj) > 0
    code = (bits.long() << torch.arange(proj.shape[1], device=x.device)).sum(-1)
    return gray_rank(proj.shape[1], x.device)[code]


def bucket_histogram(buckets: torch.Tensor, block: int, n_buckets: int) -> torch.Tensor:
    """``[B, H, T]`` -> ``[B, H, ceil(T / block), n_buckets]`` how many tokens of each block fall in each bucket."""
    b, h, t = buckets.shape
    n_blocks = -(-t // block)
    index = (torch.arange(t, device=buckets.device) // block) * n_buckets + buckets
    hist = torch.zeros(b, h, n_blocks * n_buckets, device=buckets.device)
    hist.scatter_add_(-1, index, torch.ones_like(index, dtype=hist.dtype))
    return hist.view(b, h, n_blocks, n_buckets)


def sorted_range_overlap(key_counts: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, H, nb]`` keys per bucket -> ``[B, H, nb, nb]``: the fraction of bucket ``c``'s keys inside the sorted
    range that a query of bucket ``b`` sees (its own bucket's keys, widened to ``width`` keys around their middle)."""
    hi = key_counts.cumsum(-1)
    lo = hi - key_counts
    middle = (lo + hi) / 2
    start = torch.minimum(lo, middle - width / 2).clamp(min=0)
    end = torch.maximum(hi, middle + width / 2).clamp(max=hi[..., -1:])
    inside = (torch.minimum(end[..., :, None], hi[..., None, :]) - torch.maximum(start[..., :, None], lo[..., None, :]))
    return inside.clamp(min=0) / key_counts.clamp(min=1)[..., None, :]


def lsh_block_scores(query, key, proj, g: BlockGeometry, width: int, k_hist: torch.Tensor | None = None):
    """``[B, Hq, NQ, NK]`` expected (query, key) pairs of each block pair that share a sorted bucket range;
    ``k_hist``: the keys' block histogram when already known (``key_histogram``)."""
    n_buckets = 1 << proj.shape[1]
    groups = query.shape[1] // key.shape[1]
    q_hist = bucket_histogram(lsh_buckets(query, proj), g.block_q, n_buckets)  # [B, Hq, NQ, nb]
    if k_hist is None:
        k_hist = bucket_histogram(lsh_buckets(key, proj), g.block_k, n_buckets)  # [B, Hkv, NK, nb]
    return shared_range_pairs(q_hist, k_hist, width, groups)


def key_histogram(key, proj, block: int, past: int, previous: KeyHistogram | None) -> torch.Tensor:
    """``[B, Hkv, NK, 2^p]`` the keys' block histogram: the ``previous`` call's, with the blocks from the one that
    gained keys on re-hashed (at most one block of keys for a decode step), when it counts exactly the ``past`` keys
    before this call's with the same rows, hyperplanes and blocks; else every key hashed.  Counts are integers in
    fp32, so both ways give the same tensor bit for bit (and the same scores)."""
    n_buckets = 1 << proj.shape[1]
    if not continues(previous, key, proj, block, past):
        return bucket_histogram(lsh_buckets(key, proj), block, n_buckets)
    first = past // block  # the first block that gained keys since the last call
    tail = bucket_histogram(lsh_buckets(key[:, :, first * block:], proj), block, n_buckets)
    counts = previous.counts
    # In place when the blocks are the same (the last one grew); not into a tensor made under inference_mode from
    # outside it (torch refuses), nor when the cache started a block: then a copy (once per block).
    if counts.shape[2] == first + tail.shape[2] and (torch.is_inference_mode_enabled() or not counts.is_inference()):
        counts[:, :, first:] = tail
        return counts
    return torch.cat([counts[:, :, :first], tail], dim=2)


def continues(previous: KeyHistogram | None, key, proj, block: int, past: int) -> bool:
    """Whether ``previous`` counts exactly this call's first ``past`` keys, from what the host knows (no device
    read): same rows, heads, device and hyperplanes, and it counted ``past`` keys.  Only a one-row batch keeps one
    (``keeps_histogram``): a larger batch may be reordered (beam search) with nothing the host sees changing."""
    if previous is None or past <= 0 or previous.tokens != past or previous.block != block:
        return False
    counts = previous.counts
    return (previous.projections is proj and counts.device == key.device and counts.shape[:2] == key.shape[:2]
            and counts.shape[2] == -(-past // block) and counts.shape[3] == 1 << proj.shape[1])


def keeps_histogram(key) -> bool:
    """Whether this call keeps its key histogram for the next: a batch of one row (a cache whose rows cannot be
    reordered under it), on the host (a compiled step keeps no graph output across steps)."""
    return key.shape[0] == 1 and not torch.compiler.is_compiling()


def shared_range_pairs(q_hist: torch.Tensor, k_hist: torch.Tensor, width: int, groups: int) -> torch.Tensor:
    """``[B, Hq, NQ, NK]`` from query-block and key-block bucket histograms (``[B, Hq, NQ, nb]``, ``[B, Hkv, NK,
    nb]``): the expected pairs that share a sorted bucket range."""
    overlap = sorted_range_overlap(k_hist.sum(2), width)  # [B, Hkv, nb, nb]
    per_bucket = (overlap @ k_hist.transpose(-1, -2)).repeat_interleave(groups, dim=1)  # [B, Hq, nb, NK]
    return q_hist @ per_bucket


# ---- selection ---------------------------------------------------------------------------------------------------
def top_blocks(scores: torch.Tensor, k: int, lowest_first: bool = False) -> torch.Tensor:
    """bool mask of the ``k`` best finite, positive entries of each row; ``lowest_first``: ties go to the lowest
    index (a stable sort) whatever the row's width, instead of ``torch.topk``'s order."""
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    k = min(k, scores.shape[-1])
    if k > 0:
        if lowest_first:
            values, indices = torch.sort(scores, dim=-1, descending=True, stable=True)
            values, indices = values[..., :k], indices[..., :k]
        else:
            values, indices = scores.topk(k, dim=-1)
        chosen.scatter_(-1, indices, torch.isfinite(values) & (values > 0))
    return chosen


def top_blocks_lowest_first(scores: torch.Tensor, k: int) -> torch.Tensor:
    return top_blocks(scores, k, lowest_first=True)


def sampled_blocks(state, g: BlockGeometry, heads: int, free: torch.Tensor) -> torch.Tensor:
    """``[1, H, NQ, NK]`` ``ceil(sample_size / block)`` uniform blocks among the ``free`` ones of each query block.

    One random priority per (key block, head), from ``seed + layer``, shared by all query blocks (the paper samples
    one column set for all queries); drawn as ``[NK, H]`` so a longer cache keeps the earlier blocks' priorities.
    """
    count = math.ceil(state.config.sample_size / g.block_k)
    priority = sampling_priority(state, g.n_k, heads, free.device)
    return top_blocks(priority[None, :, None, :].masked_fill(~free, float("-inf")), count)


def sampling_priority(state, n_k: int, heads: int, device) -> torch.Tensor:
    """``[H, NK]`` the sampling priorities (> 0 for ``top_blocks``), drawn on the host once per shape and kept on
    the device; inside a compiled step they are a constant of the graph (drawn at compile time, never kept)."""
    seed = state.config.seed * SEED_STRIDE + state.layer_index
    if torch.compiler.is_compiling():
        return _drawn_priority(seed, n_k, heads, str(device))
    shape = (n_k, heads, torch.device(device))
    kept = state.method_state
    if kept.priority is None or kept.priority_shape != shape:
        kept.priority = _draw_priority(seed, n_k, heads, device)
        kept.priority_shape = shape
    return kept.priority


def _draw_priority(seed: int, n_k: int, heads: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n_k, heads, generator=gen).T.to(device) + 1.0


@torch.compiler.assume_constant_result
def _drawn_priority(seed: int, n_k: int, heads: int, device: str) -> torch.Tensor:
    return _draw_priority(seed, n_k, heads, device)


def select_hyper(g: BlockGeometry, query, key, state, keep: bool | None = None):
    """``keep``: whether this call keeps its key histogram for the next (default ``keeps_histogram``)."""
    config, kept = state.config, state.method_state
    kept.key_buckets.built = False  # a host-path call: the row decode rebuilds its bucket counts
    # Taken, not read: a call that keeps none (below min_seq_len, another path) leaves none, so the next recounts.
    previous, kept.key_hist = kept.key_hist, None
    allowed = causal_allowed(g, query.device)
    if g.kv_len < config.min_seq_len:
        return allowed
    forced = forced_blocks(g, config.sink_blocks, config.local_blocks, query.device) & allowed
    proj = lsh_projections(state, query.shape[-1], query.device)
    keep = keeps_histogram(key) if keep is None else keep
    k_hist = key_histogram(key, proj, g.block_k, g.kv_len - g.q_len, previous if keep else None)
    if keep:
        kept.key_hist = KeyHistogram(k_hist, g.kv_len, g.block_k, proj)
    scores = lsh_block_scores(query, key, proj, g, config.bucket_keys, k_hist)
    pick = top_blocks_lowest_first if config.ties == "lowest" else top_blocks
    chosen = pick(scores.masked_fill(~allowed | forced, float("-inf")), config.lsh_blocks) | forced
    sampled = sampled_blocks(state, g, query.shape[1], allowed & ~chosen)
    return chosen | sampled


# ---- decode over rows of different lengths (a static cache, a padded batch) ---------------------------------------
def row_key_buckets(state, key: torch.Tensor, rows: RowGeometry, proj: torch.Tensor) -> torch.Tensor:
    """``KeyBuckets.counts`` for this step: built from every key of each row on the first row step of a sequence,
    else each row's newest block recomputed in place (idempotent: a step run twice gives the same counts)."""
    kept = state.method_state.key_buckets
    n_buckets = 1 << proj.shape[1]
    b, h = key.shape[:2]
    shape = (b, h, rows.n_k, n_buckets)
    counts = kept.counts
    if counts is not None and counts.device != key.device:
        counts = kept.counts = None  # the model moved: a new buffer
    starts = rows.starts if rows.starts is not None else torch.zeros_like(rows.lengths)
    if kept.built and counts is not None and counts.shape[:2] == (b, h) and counts.shape[3] == n_buckets:
        if counts.shape[2] < rows.n_k:  # a growing (default) cache started a block: row-relative blocks stay put
            counts = kept.counts = torch.nn.functional.pad(counts, (0, 0, 0, rows.n_k - counts.shape[2]))
        if counts.shape == shape:
            newest = (rows.row_blocks().reshape(-1) - 1).clamp(min=0).long()
            first = starts.long() + newest * rows.block_k
            fresh = _bucket_counts(key, first, starts.long() + rows.lengths.long(), rows.block_k, 1, proj)
            counts.scatter_(2, newest.reshape(-1, 1, 1, 1).expand(b, h, 1, n_buckets), fresh)
            return counts
    fresh = _bucket_counts(key, starts.long(), starts.long() + rows.lengths.long(), rows.block_k, rows.n_k, proj)
    if counts is not None and counts.shape == shape:
        counts.copy_(fresh)  # the last sequence's buffer: no new allocation
    else:
        counts = kept.counts = fresh
    kept.built = True
    return counts


def _bucket_counts(key, first, end, block: int, n_blocks: int, proj) -> torch.Tensor:
    """``[B, Hkv, n_blocks, 2^p]`` bucket histogram of the blocks of keys ``first[b]`` ... of each row, keys from
    ``end[b]`` on not counted (static shapes: a gather of ``n_blocks * block`` keys per row)."""
    b, h, t, d = key.shape
    n_buckets = 1 << proj.shape[1]
    positions = first[:, None] + torch.arange(n_blocks * block, device=key.device)  # [B, n_blocks * block]
    real = positions < end[:, None]
    rows = key.gather(2, positions.clamp(max=t - 1)[:, None, :, None].expand(b, h, n_blocks * block, d))
    buckets = lsh_buckets(rows, proj)  # [B, Hkv, n_blocks * block]
    index = (torch.arange(n_blocks * block, device=key.device) // block) * n_buckets + buckets
    counts = torch.zeros(b, h, n_blocks * n_buckets, device=key.device)
    counts.scatter_add_(-1, index, real[:, None, :].expand(b, h, -1).to(counts.dtype))
    return counts.view(b, h, n_blocks, n_buckets)


def decode_hyper_rows(rows: RowGeometry, query, key, state):
    """``select_hyper``'s decode step for rows of different lengths.  With ``ties="lowest"``: on the device with
    static shapes -- each row's LSH scores from its own keys' bucket counts (``KeyBuckets``), its forced blocks
    counted from its first real key, its samples by the same priorities as alone, every block below ``min_seq_len``
    keys; ``density`` resolved at the cache's capacity.  With ``ties="topk"`` (torch's order, which depends on the
    row's width): each row selected alone on the host (``_decode_rows_on_host``)."""
    drop_host_histograms(state.method_state, this_state=state.config.ties == "lowest")
    if state.config.ties != "lowest":
        return _decode_rows_on_host(rows, query, key, state)
    with budget_applied(state, rows.geometry()):
        config = state.config
        n_k = rows.n_k
        n_valid = rows.row_blocks().reshape(-1)
        allowed = (torch.arange(n_k, device=query.device) < n_valid.reshape(-1, 1, 1, 1))  # [B, 1, 1, NK]
        forced = forced_decode_blocks(n_k, config.sink_blocks, config.local_blocks, query.device, n_valid)[:, None]
        proj = lsh_projections(state, query.shape[-1], query.device)
        scores = rows_lsh_scores(query, row_key_buckets(state, key, rows, proj), proj, config.bucket_keys)
        chosen = top_blocks_lowest_first(scores.masked_fill(~allowed | forced, float("-inf")), config.lsh_blocks)
        chosen = chosen | forced
        count = math.ceil(config.sample_size / rows.block_k)
        priority = sampling_priority(state, n_k, query.shape[1], query.device)
        sampled = top_blocks(priority[None, :, None, :].masked_fill(~(allowed & ~chosen), float("-inf")), count)
        short = (rows.lengths < config.min_seq_len).reshape(-1, 1, 1, 1)
        mask = torch.where(short, allowed, chosen | sampled)
        return blocks_from_mask(mask, width=decode_width(config, rows.geometry()))


def drop_host_histograms(kept: HyperState, this_state: bool) -> None:
    """A rows decode step: the row groups' histograms (from a padded prefill) and, on the device path
    (``this_state``), this state's are not followed from here on (a later host call recounts), so they are freed now
    rather than at the next prefill.  (With ``ties="topk"`` a batch of one row continues this state's.)"""
    if this_state:
        kept.key_hist = None
    for group in kept.row_states.values():
        group.key_hist = None


def _decode_rows_on_host(rows: RowGeometry, query, key, state):
    """Each row's ``select_hyper`` on its own keys, as alone (a host read of the rows' bounds: the step does not
    compile whole), as lists counted from each row's first key.  A batch of one row keeps its key histogram (a static
    cache's decode); rows of a larger batch may be reordered between steps (beam search), so each is recounted."""
    n_k = rows.n_k
    keep = len(rows.lengths) == 1 and keeps_histogram(key)
    starts = [0] * len(rows.lengths) if rows.starts is None else rows.starts.tolist()
    masks = torch.zeros(len(starts), query.shape[1], 1, n_k, dtype=torch.bool, device=query.device)
    for row, (start, length) in enumerate(zip(starts, rows.lengths.tolist())):
        if length:
            g = BlockGeometry(1, length, rows.block_q, rows.block_k)
            with budget_applied(state, g):
                masks[row:row + 1, ..., :g.n_k] = select_hyper(g, query[row:row + 1], key[row:row + 1, :,
                                                                                      start:start + length], state,
                                                               keep=keep)
    return blocks_from_mask(masks, width=decode_width(state.config, rows.geometry()))


def rows_lsh_scores(query, key_counts: torch.Tensor, proj, width: int) -> torch.Tensor:
    """``lsh_block_scores`` of one query per row against its blocks' bucket counts ``[B, Hkv, NK, nb]``:
    ``[B, Hq, 1, NK]``."""
    n_buckets = key_counts.shape[-1]
    groups = query.shape[1] // key_counts.shape[1]
    q_hist = torch.nn.functional.one_hot(lsh_buckets(query, proj), n_buckets).float()  # [B, Hq, 1, nb]
    return shared_range_pairs(q_hist, key_counts, width, groups)




hyper_attention = register_sparse_method(
    "hyper",
    config=HyperConfig,
    paper="Han et al., HyperAttention: Long-context Attention in Near-Linear Time (ICLR 2024), arXiv 2310.05869",
    select=select_hyper,
    decode_rows=decode_hyper_rows,
    state_cls=HyperState,
    static=False,
    doc="sortLSH bucket collisions and uniformly sampled key blocks per query block, plus sink/local.",
)
