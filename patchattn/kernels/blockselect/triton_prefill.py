"""Triton prefill block scores: every query block's best row against every causally visible key-block mean.

``scores[b, h, m, n] = max over the rows r of query block m (and, shared per GQA group, over the group's heads) of
q_r . mean_key(n)``, for key blocks ``n`` up to the block of the query block's last position; ``-inf`` after it.
The torch path materialises the ``[rows, NK]`` products in chunks (17 GB of traffic at 128k x 32 heads); here each
program keeps a ``[block_q, BLOCK_N]`` tile in registers and writes only the per-block maxima.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..blocksparse import _alloc
from ..blocksparse.triton_lists import zero_tail
from ..blocksparse.triton_fwd import dot_precision, last_dim_contiguous, mma, reduce_max
from .triton_select import _choose_blocks, _write_ascending

BLOCK_N = 64


@triton.jit
def _prefill_scores_kernel(Q, Means, Scores, sqb, sqh, sqt, smb, smh, smn, ssb, ssh, ssm,
                           Tq, Tk, n_k, n_lists,
                           GROUP: tl.constexpr, HEADS_PER_LIST: tl.constexpr, BQ: tl.constexpr,
                           BK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    m = tl.program_id(0)
    pid = tl.program_id(1)
    b = (pid // n_lists).to(tl.int64)
    h_list = pid % n_lists
    h0 = h_list * HEADS_PER_LIST  # first query head of this list
    hkv = h0 // GROUP
    r = tl.arange(0, BQ)
    rows = m * BQ + r
    row_ok = rows < Tq
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    last_pos = tl.minimum((m + 1) * BQ, Tq) - 1 + (Tk - Tq)
    diagonal = last_pos // BK
    out_ptr = Scores + b * ssb + h_list * ssh + m * ssm
    for n0 in range(0, n_k, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        if n0 <= diagonal:
            means = tl.load(Means + b * smb + hkv * smh + n[None, :] * smn + d[:, None],
                            mask=(n[None, :] < n_k) & d_ok[:, None], other=0.0)
            best = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
            for g in range(HEADS_PER_LIST):
                q = tl.load(Q + b * sqb + (h0 + g) * sqh + rows[:, None] * sqt + d[None, :],
                            mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                s = mma(q, means.to(q.dtype), tl.full([BQ, BLOCK_N], 0.0, dtype=tl.float32), DOT_PRECISION)
                best = tl.maximum(best, reduce_max(tl.where(row_ok[:, None], s, float("-inf")), 0))
            tl.store(out_ptr + n, tl.where(n <= diagonal, best, float("-inf")), mask=n < n_k)
        else:
            tl.store(out_ptr + n, tl.full([BLOCK_N], float("-inf"), dtype=tl.float32), mask=n < n_k)


def prefill_block_scores(query, k_means, *, block_q: int, block_k: int, kv_len: int, per_head: bool, options):
    """``[B, H, NQ, NK]`` fp32 scores (H = Hq with ``per_head``, else Hkv); see the module docstring."""
    query, k_means = last_dim_contiguous(query), last_dim_contiguous(k_means)
    B, Hq, Tq, D = query.shape
    Hkv, n_k = k_means.shape[1], k_means.shape[2]
    group = Hq // Hkv
    n_lists = Hq if per_head else Hkv
    n_q = triton.cdiv(Tq, block_q)
    scores = _alloc.empty((B, n_lists, n_q, n_k), torch.float32, query.device, options.poison_outputs)
    _prefill_scores_kernel[(n_q, B * n_lists)](
        query, k_means, scores, *query.stride()[:3], *k_means.stride()[:3], *scores.stride()[:3],
        Tq, kv_len, n_k, n_lists, GROUP=group, HEADS_PER_LIST=1 if per_head else group, BQ=block_q, BK=block_k,
        HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_N=BLOCK_N,
        DOT_PRECISION=dot_precision(query.dtype), num_warps=4 if block_q <= 64 else 8)
    return scores


# ---------------------------------------------------------------------------------------------
# Prefill selection: every query block's row of scores -> its ascending block list, in one program
# ---------------------------------------------------------------------------------------------
@triton.jit
def _prefill_select_kernel(Scores, Idx, Cnt, ssb, ssh, ssm, sib, sih, sim, scb, sch, n_q, Tq, Tk, width, top_k,
                           sink_blocks, local_blocks, mass, inv_root_d,
                           BQ: tl.constexpr, BK: tl.constexpr, USE_MASS: tl.constexpr, LAST_DENSE: tl.constexpr,
                           NK_POW2: tl.constexpr, CHUNK: tl.constexpr):
    m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    n_visible = (tl.minimum((m + 1) * BQ, Tq) - 1 + (Tk - Tq)) // BK + 1  # blocks up to the diagonal
    cols = tl.arange(0, NK_POW2)
    valid = cols < n_visible
    raw = tl.load(Scores + b * ssb + h * ssh + m * ssm + cols, mask=valid, other=float("-inf"))
    chosen = _choose_blocks(raw, cols, n_visible, top_k, sink_blocks, local_blocks, mass, inv_root_d, USE_MASS)
    if LAST_DENSE:  # the prefill's last query block reads every visible block
        chosen = chosen | (valid & (m == n_q - 1))
    row = Idx + b * sib + h * sih + m * sim
    count = _write_ascending(row, chosen, cols)
    zero_tail(row, count, width, CHUNK)  # entries past the count are 0, as the mask path leaves them
    tl.store(Cnt + b * scb + h * sch + m, count)


def prefill_block_select(scores, *, q_len: int, block_q: int, block_k: int, kv_len: int, top_k: int, sink_blocks: int,
                         local_blocks: int, mass: float, head_dim: int, last_block_dense: bool, options):
    """(kv_indices int32 ``[B, H, NQ, W]``, kv_counts int32 ``[B, H, NQ]``) from ``[B, H, NQ, NK]`` scores."""
    scores = last_dim_contiguous(scores)
    B, H, n_q, n_k = scores.shape
    last_block_dense = last_block_dense and n_q > 1
    width = n_k if last_block_dense else max(1, min(n_k, top_k + sink_blocks + local_blocks))
    idx = _alloc.empty((B, H, n_q, width), torch.int32, scores.device, options.poison_outputs)
    counts = _alloc.empty((B, H, n_q), torch.int32, scores.device, options.poison_outputs)
    nk_pow2 = max(16, triton.next_power_of_2(n_k))
    _prefill_select_kernel[(n_q, H, B)](
        scores, idx, counts, *scores.stride()[:3], *idx.stride()[:3], *counts.stride()[:2], n_q, q_len, kv_len, width,
        min(top_k, n_k), sink_blocks, local_blocks, float(mass), head_dim ** -0.5, BQ=block_q, BK=block_k,
        USE_MASS=mass < 1.0, LAST_DENSE=last_block_dense, NK_POW2=nk_pow2,
        CHUNK=min(1024, max(16, triton.next_power_of_2(width))),
        num_warps=4 if nk_pow2 <= 4096 else 8)
    return idx, counts
