"""Triton HiP tree search (prefill): each query block's hierarchical top-k over key blocks in one program.

The torch path (:func:`.reference.tree_search_torch`) materialises every round's candidate means as
``[B, H, NQ, 2k, D]`` gathers (at 128k x 32 heads: ~0.7 GB per gather, 8 rounds) and casts the queries to fp32.
Here one program per (query block, batch, list head) keeps its ``k`` segments in registers for all rounds: a round
loads the prefix sums at the segments' starts, midpoints and ends (``3 x [KH, D]`` fp32, from L2), scores both
halves of every segment against the block's rows, and keeps the ``k`` best by ranks computed from pairwise
comparisons (ties: left halves first, then the lower slot), compacted with a one-hot reduction — no sort, no
gather.  Output: each kept segment's first block, ``-1`` for empty ones.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..blocksparse.triton_fwd import INTERPRETING, dot_precision, last_dim_contiguous, mma, reduce_max, reduce_sum
from .reference import search_rounds, segments_to_mask

MAX_K = 64  # k segments live in registers as [KH] vectors and [KH, KH] rank matrices; more falls back to torch
# fp32 queries: ~fp32-exact scores on tensor cores (3xTF32).  16-bit queries multiply the segment means rounded to
# their dtype (exact products, fp32 sums, as the torch path does for them): at head_dim 128 a program then needs
# 20-24 KB of shared memory instead of 32-64 KB with fp32 operands, so more programs hide the rounds' latency
# (H200, 128k: 18.1 -> 8.7 ms together with one stage, bench/methods/tree_tune_run*.log).  Warps and stages:
# KernelOptions.tree_warps / tree_stages (defaults 4 and 1: no software pipelining of the rounds, each round's loads
# depend on the previous round's choice, so extra stages only multi-buffer the query tile, 45 vs 20 KB of shared
# memory a program with bf16 queries at head_dim 128).
PRECISION = "ieee" if INTERPRETING else "tf32x3"


@triton.jit
def _best_rows(q, row_ok, means_left, means_right, PRECISION: tl.constexpr):
    """``[KH]`` x 2: the best row's score against each left and each right segment mean (``[KH, D]``), the means
    rounded to the queries' dtype."""
    s_left = mma(q, tl.trans(means_left.to(q.dtype)), None, PRECISION)  # [BQ, KH] fp32
    s_right = mma(q, tl.trans(means_right.to(q.dtype)), None, PRECISION)
    return (reduce_max(tl.where(row_ok[:, None], s_left, float("-inf")), 0),
            reduce_max(tl.where(row_ok[:, None], s_right, float("-inf")), 0))


@triton.jit
def _segment_means(p_base, spn, lo, hi, d, d_ok):
    """``[KH, D]`` mean key of blocks ``[lo, hi)`` from the prefix sums (zero rows for empty segments)."""
    p_lo = tl.load(p_base + lo[:, None] * spn + d[None, :], mask=d_ok[None, :], other=0.0)
    p_hi = tl.load(p_base + hi[:, None] * spn + d[None, :], mask=d_ok[None, :], other=0.0)
    return tl.div_rn(p_hi - p_lo, tl.maximum(hi - lo, 1).to(tl.float32)[:, None])


@triton.jit
def _compact(values_left, values_right, rank_left, rank_right, slot):
    """Value of the candidate ranked ``r`` for every slot ``r``: a one-hot reduction over the candidates."""
    left = reduce_sum(tl.where(rank_left[:, None] == slot[None, :], values_left[:, None], 0), 0)
    right = reduce_sum(tl.where(rank_right[:, None] == slot[None, :], values_right[:, None], 0), 0)
    return left + right


@triton.jit
def _tree_search_kernel(Q, Prefix, Out, sqb, sqh, sqt, spb, sph, spn, sob, soh, som,
                        Tq, Tk, n_lists, rounds,
                        GROUP: tl.constexpr, HEADS_PER_LIST: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                        K: tl.constexpr, KH: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        PRECISION: tl.constexpr):
    m = tl.program_id(0)
    pid = tl.program_id(1)
    b = (pid // n_lists).to(tl.int64)
    h_list = pid % n_lists
    h0 = h_list * HEADS_PER_LIST  # first query head of this list
    rows = m * BQ + tl.arange(0, BQ)
    row_ok = rows < Tq
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q_base = Q + b * sqb
    p_base = Prefix + b * spb + (h0 // GROUP) * sph
    # Causal past of the block's last row (queries sit at the end of the keys), cut into K near-equal segments.
    n_visible = (tl.minimum((m + 1) * BQ, Tq) - 1 + (Tk - Tq)) // BK + 1
    slot = tl.arange(0, KH)
    live = slot < K
    start = tl.where(live, slot * n_visible // K, 0)
    end = tl.where(live, (slot + 1) * n_visible // K, 0)
    ahead = slot[None, :] < slot[:, None]  # [i, j]: slot j comes before slot i in the candidate order
    q_ptrs = q_base + rows[:, None] * sqt + d[None, :]
    q_mask = row_ok[:, None] & d_ok[None, :]
    for _ in range(rounds):
        mid = tl.where(end - start > 1, (start + end) // 2, end)
        means_left = _segment_means(p_base, spn, start, mid, d, d_ok)
        means_right = _segment_means(p_base, spn, mid, end, d, d_ok)
        # The best row of the block (of every head of the list: one search per GQA group without per_head).  The
        # rows are re-read each round (from L2): held across rounds they would sit in shared memory as fp32 dot
        # operands, 128 KB a program at head_dim 128 (one program per SM) instead of 48 KB.
        s_left = tl.full([KH], float("-inf"), dtype=tl.float32)
        s_right = tl.full([KH], float("-inf"), dtype=tl.float32)
        for g in range(HEADS_PER_LIST):
            q = tl.load(q_ptrs + (h0 + g) * sqh, mask=q_mask, other=0.0, volatile=True)
            best_left, best_right = _best_rows(q, row_ok, means_left, means_right, PRECISION)
            s_left = tl.maximum(s_left, best_left)
            s_right = tl.maximum(s_right, best_right)
        s_left = tl.where(live & (mid > start), s_left, float("-inf"))
        s_right = tl.where(live & (end > mid), s_right, float("-inf"))
        # Rank = candidates strictly better, or equal and earlier (every left half precedes every right half).
        rank_left = (reduce_sum(((s_left[None, :] > s_left[:, None])
                                 | ((s_left[None, :] == s_left[:, None]) & ahead)).to(tl.int32), 1)
                     + reduce_sum((s_right[None, :] > s_left[:, None]).to(tl.int32), 1))
        rank_right = (reduce_sum((s_left[None, :] >= s_right[:, None]).to(tl.int32), 1)
                      + reduce_sum(((s_right[None, :] > s_right[:, None])
                                    | ((s_right[None, :] == s_right[:, None]) & ahead)).to(tl.int32), 1))
        new_start = _compact(start, mid, rank_left, rank_right, slot)
        end = tl.where(live, _compact(mid, end, rank_left, rank_right, slot), 0)
        start = tl.where(live, new_start, 0)
    out = tl.where(end > start, start, -1)
    tl.store(Out + b * sob + h_list * soh + m * som + slot, out, mask=live)


def tree_search(query: torch.Tensor, k_means: torch.Tensor, *, block_q: int, block_k: int, kv_len: int, k: int,
                per_head: bool, options) -> torch.Tensor:
    """bool ``[B, H, NQ, NK]`` (H = Hq with ``per_head``, else Hkv): each query block's ``k`` blocks by HiP's search,
    scored by the block's best row (of its GQA group without ``per_head``); queries at the end of the ``kv_len``
    keys."""
    query, k_means = last_dim_contiguous(query), last_dim_contiguous(k_means)
    B, Hq, Tq, D = query.shape
    Hkv, n_k = k_means.shape[1], k_means.shape[2]
    prefix = torch.nn.functional.pad(k_means.cumsum(dim=2, dtype=torch.float32), (0, 0, 1, 0)).contiguous()
    n_q = math.ceil(Tq / block_q)
    group = Hq // Hkv
    n_lists = Hq if per_head else Hkv
    starts = torch.empty((B, n_lists, n_q, k), dtype=torch.int32, device=query.device)
    _tree_search_kernel[(n_q, B * n_lists)](
        query, prefix, starts, *query.stride()[:3], *prefix.stride()[:3], *starts.stride()[:3],
        Tq, kv_len, n_lists, search_rounds(n_k, k),
        GROUP=group, HEADS_PER_LIST=1 if per_head else group, BQ=block_q, BK=block_k, K=k,
        KH=max(16, triton.next_power_of_2(k)), HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
        PRECISION=PRECISION if query.dtype == torch.float32 else dot_precision(query.dtype),
        num_warps=options.tree_warps, num_stages=options.tree_stages)
    starts = starts.long()
    return segments_to_mask(starts, starts + (starts >= 0).long(), n_k)  # -1: an empty segment
