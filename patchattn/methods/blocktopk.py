"""``blocktopk`` — block top-k attention (Kinetics' block top-k; the routing of MoBA and BiFormer).

Keys are mean-pooled per block (a compressed key cache, updated incrementally while decoding); each key block is
scored against the best query row of the query block (``score="max"``; ``"mean"`` pools the queries too, as
Kinetics and MoBA do); each query block and head (``per_head``; or once per GQA group) keeps the best-scoring
key blocks of its causal past until their estimated share of the softmax mass reaches ``mass`` (at most
``top_k``), plus the sink block(s) and its ``local_blocks`` nearest blocks.  Recomputed on every call, so
decoding re-selects as the cache grows (Kinetics selects per decode step, too).

Defaults (64-token blocks, per head, max-row scores, mass 0.97 capped at 24 blocks) come from a sweep on
SmolLM2 at 8k tokens: +4.6% perplexity at 21.8% density, where a fixed top-14 gave +7.6% at 24.7%
(bench/quality/).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import option
from ..kernels.blockselect import (
    decode_block_topk,
    max_list_width,
    prefill_block_choice,
    prefill_block_scores,
    prefill_block_select,
)
from ..masks import BlockGeometry
from ..registry import register_method
from ._sparse import LAST_BLOCK_DENSE_HELP, SparseConfig, sparse_forward


@dataclass(kw_only=True)
class BlockTopKConfig(SparseConfig):
    top_k: int = option(24, "content-selected key blocks per query block (the cap when mass < 1)", min=0)
    sink_blocks: int = option(1, "initial blocks always read", min=0)
    local_blocks: int = option(2, "nearest blocks always read (includes the diagonal block)", min=1)
    mass: float = option(0.97, "adaptive budget: keep the best blocks until their estimated share of the softmax "
                         "mass reaches this (1.0 = always top_k; top_k stays the cap)", min=0.0, max=1.0)
    decode_mass: float = option(1.0, "the mass budget while decoding (one query row per step): 1.0 reads the top_k "
                                "cap, which costs a few blocks of bandwidth per step and keeps copied answers intact",
                                min=0.0, max=1.0)
    last_block_dense: bool = option(True, LAST_BLOCK_DENSE_HELP)
    per_head: bool = option(True, "select per query head (better quality); False shares one selection per GQA "
                            "group, so the group reads each KV block once")
    fused_scores: bool = option(True, "prefill 'max' scores from the fused Triton kernel (kernels/blockselect) instead "
                                "of the chunked torch products: same lists on the H200, selection at 128k 29.9 -> 21.0 "
                                "ms (bench/methods/RESULTS.md, run 6); the torch backend always uses the torch path")
    fused_select: bool = option(True, "prefill choice from the scores straight to block lists in one Triton kernel "
                                "(kernels/blockselect) instead of torch top-k, masks and lists; the torch backend "
                                "always uses the torch path")
    score: str = option("max", "block score: 'mean' (pooled query . pooled key, as Kinetics/MoBA) or 'max' (best "
                        "query row of the block and GQA group . pooled key)", choices=("mean", "max"))

    DENSE_EQUIVALENT: ClassVar[dict] = {"top_k": 1 << 30, "mass": 1.0, "decode_mass": 1.0}

    def max_blocks_per_row(self, n_k: int) -> int:
        return max_list_width(n_k, self.top_k, self.sink_blocks, self.local_blocks)


def block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """``[B, H, T, D]`` -> ``[B, H, ceil(T / block), D]`` mean over each block's real (unpadded) rows."""
    b, h, t, d = x.shape
    n = -(-t // block)
    if n == 1:  # one (possibly partial) block, e.g. the newest block while decoding: a single reduction
        return x.mean(dim=2, keepdim=True, dtype=torch.float32)
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, n * block - t))
    sums = padded.view(b, h, n, block, d).sum(dim=3)
    # Rows per block (the last one may be short), built on the device: no host-to-device copy under graph capture.
    counts = (t - torch.arange(n, device=x.device) * block).clamp(max=block).float()
    return sums / counts[:, None]


def _cache_fits(cached, key: torch.Tensor) -> bool:
    """Whether a cached compressed key cache belongs to keys of this batch, head count and dtype."""
    return (cached is not None and cached["means"].shape[:2] == key.shape[:2]
            and cached["means"].dtype == key.dtype)


def key_block_means(state, key: torch.Tensor, block: int, q_len: int) -> torch.Tensor:
    """``[B, Hkv, NK, D]`` mean key per block, kept in the patch state as a compressed key cache.

    A prefill computes it from scratch; a decode step (a few new queries, the cache only grew) recomputes only the
    blocks that changed, so selecting blocks never re-reads the whole KV cache (Kinetics' page means).  Means are
    summed in fp32 and stored in the keys' dtype: a decode step's scoring reads the whole compressed cache, and
    fp32 means were more bytes than the K/V blocks the attention then reads (batch 8, bench/decode/RESULTS.md).
    """
    cached = state.cache.get("key_means")
    t = key.shape[2]
    if q_len > 16 or not _cache_fits(cached, key) or cached["length"] > t:
        means = block_means(key, block).to(key.dtype)
    elif cached["length"] == t:
        means = cached["means"]
    else:
        first = cached["length"] // block  # the first block that gained keys since the last call
        tail = block_means(key[:, :, first * block :], block).to(key.dtype)
        means = cached["means"]
        if means.shape[2] == first + tail.shape[2]:
            means[:, :, first:] = tail  # same blocks, the last one grew: update in place
        else:
            means = torch.cat([means[:, :, :first], tail], dim=2)
    state.cache["key_means"] = {"length": t, "means": means}
    return means


def block_scores(query, k_means, g: BlockGeometry, mode: str, per_head: bool = False,
                 backend: str = "torch", fused: bool = False) -> torch.Tensor:
    """``[B, H, NQ, NK]`` estimated relevance of each key block to each query block; H is the number of KV heads
    (one selection shared by each GQA group) or, with ``per_head``, of query heads.  Entries after a query block's
    causal diagonal are unspecified (the caller masks them)."""
    b, hq, _, d = query.shape
    hkv = k_means.shape[1]
    if mode == "max":
        return prefill_block_scores(query, k_means, block_q=g.block_q, block_k=g.block_k, kv_len=g.kv_len,
                                    per_head=per_head, backend=backend if fused and g.n_q > 1 else "torch")
    q_means = block_means(query, g.block_q).view(b, hkv, hq // hkv, g.n_q, d)
    scores = q_means @ k_means.float()[:, :, None].transpose(-1, -2)
    return scores.flatten(1, 2) if per_head else scores.mean(dim=2)


def forced_blocks(g: BlockGeometry, sink_blocks: int, local_blocks: int, device=None) -> torch.Tensor:
    """``[NQ, NK]`` sink and local blocks, read whatever their score."""
    distance = g.diagonal_block(device)[:, None] - g.key_blocks(device)
    return (g.key_blocks(device) < sink_blocks) | ((distance >= 0) & (distance < local_blocks))


def decode_means(state, key: torch.Tensor, block: int) -> tuple[torch.Tensor, bool]:
    """Decoding: the compressed key cache, and whether only its newest block changed since the last call.

    In that case (every decode step) the newest block's mean is left to the selection kernel, which recomputes it
    from the keys as it scores (no launch of its own; a fresh block gets a row here first); otherwise the changed
    blocks are recomputed by :func:`key_block_means`.
    """
    cached = state.cache.get("key_means")
    t = key.shape[2]
    n = -(-t // block)
    if not _cache_fits(cached, key) or not (n - 1) * block <= cached["length"] <= t:
        return key_block_means(state, key, block, 1), False
    means = cached["means"]
    if means.shape[2] == n - 1:  # the cache just started a block: give it a row (filled by the kernel)
        means = torch.cat([means, means.new_empty(*means.shape[:2], 1, means.shape[3])], dim=2)
    elif means.shape[2] != n:
        return key_block_means(state, key, block, 1), False
    state.cache["key_means"] = {"length": t, "means": means}
    return means, True


def decode_lists(query, key, state, mass: float = 1.0):
    """Decoding (one query row, so 'max' and 'mean' scores agree): block lists straight from the fused selection,
    by the config's ``top_k``, ``sink_blocks``, ``local_blocks``, ``per_head``, ``score`` and ``backend``; the
    compressed key cache is brought up to date on the way."""
    config = state.config
    k_means, tail = decode_means(state, key, config.block_size)
    return decode_block_topk(query[:, :, 0], k_means, top_k=config.top_k, sink_blocks=config.sink_blocks,
                             local_blocks=config.local_blocks, mass=mass, per_head=config.per_head,
                             reduce=config.score, keys=key if tail else None, block=config.block_size,
                             backend=config.backend)


def select_top_k(g: BlockGeometry, query, key, state):
    config = state.config
    if g.q_len == 1:
        return decode_lists(query, key, state, config.decode_mass)
    k_means = key_block_means(state, key, g.block_k, g.q_len)
    raw = block_scores(query, k_means, g, config.score, config.per_head, config.backend,
                       config.fused_scores)  # [B, H, NQ, NK]
    choice = dict(q_len=g.q_len, block_q=g.block_q, block_k=g.block_k, kv_len=g.kv_len, top_k=config.top_k,
                  sink_blocks=config.sink_blocks, local_blocks=config.local_blocks, mass=config.mass,
                  head_dim=query.shape[-1])
    if config.fused_select:
        return prefill_block_select(raw, **choice, last_block_dense=config.last_block_dense, backend=config.backend)
    return prefill_block_choice(raw, **choice)  # a mask: the dense last block and the lists come from _sparse


blocktopk_attention = register_method(
    "blocktopk",
    config=BlockTopKConfig,
    category="sparse",
    families=("llm", "lvlm"),
    patterns=("causal-self",),
    paper="Sadhukhan et al., Kinetics: Rethinking Test-Time Scaling Laws (block top-k attention), arXiv 2506.05333; "
    "routing as in MoBA (arXiv 2502.13189)",
)(
    sparse_forward("blocktopk", select_top_k, static=False, doc="Top-k key blocks per query block by mean-pooled scores, plus sink and local blocks.")
)
