"""Triton received attention: two passes, no ``Tq x Tk`` tensor.

1. ``_lse_kernel``, one program per (batch x head, query tile of BLOCK_M rows): walks every key tile with an online
   max ``m`` and sum ``l`` and writes each row's log-sum-exp ``m + log2 l`` (log2 units; ``+inf`` for a row that
   sees no key, so its probabilities come out 0).
2. ``_column_kernel``, one program per (batch x head, key tile of BLOCK_N keys): walks every query tile, recomputes
   the scores with the keys on the rows, ``p = 2^(s - lse)`` (the softmax, already normalised) and adds the row sums
   over queries into a per-key fp32 accumulator; writes ``sum_i p_ij / Tq``.

Each pass does one ``q kᵀ`` product and one exp2 per score (the attention forward does two products), so the whole
costs about one attention forward.  Scores in log2 units, tile loads, matmul (fp32 in IEEE precision, 16-bit on
tensor cores, upcast under the interpreter), reductions and the launcher are the block-sparse engine's
(:mod:`patchattn.kernels.blocksparse.triton_fwd`).  GQA/MQA read k in place; head dims padded to a power of 2.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..blocksparse import _alloc
from ..blocksparse.triton_fwd import (
    LOG2E,
    interpreter_tiles,
    last_dim_contiguous,
    launch,
    load_tile,
    mma,
    query_tile,
    reduce_max,
    reduce_sum,
)


@triton.jit
def _lse_kernel(Q, K, Lse, scale_log2, sqb, sqh, sqt, skb, skh, skt, slb, slt, Hq, Tq, Tk,
                GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh = tl.program_id(0)
    b, h, rows, row_ok, _, offs_d, d_ok, q = query_tile(Q, pid_bh, Hq, tl.program_id(1), sqb, sqh, sqt, Tq, Tq,
                                                       HEAD_DIM, BLOCK_D, BLOCK_M)
    k_base = K + b * skb + (h // GROUP) * skh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(0, Tk, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < Tk
        k = load_tile(k_base + cols[:, None] * skt + offs_d[None, :], col_ok, d_ok, True, HEAD_DIM == BLOCK_D)
        s = mma(q, tl.trans(k), None, DOT_PRECISION) * scale_log2
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, reduce_max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.math.exp2(m_i - m_use) + reduce_sum(tl.math.exp2(s - m_use[:, None]), 1)
        m_i = m_new
    lse = tl.where(l_i > 0.0, m_i + tl.math.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("inf"))
    tl.store(Lse + pid_bh * slb + rows * slt, lse, mask=row_ok)


@triton.jit
def _column_kernel(Q, K, Lse, Out, scale_log2, inv_rows, sqb, sqh, sqt, skb, skh, skt, slb, slt, sob, sot, Hq, Tq, Tk,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh = tl.program_id(0)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < Tk
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    k = load_tile(K + b * skb + (h // GROUP) * skh + cols[:, None] * skt + offs_d[None, :], col_ok, d_ok, True,
                  HEAD_DIM == BLOCK_D)
    q_base = Q + b * sqb + h * sqh
    lse_base = Lse + pid_bh * slb
    acc = tl.full([BLOCK_N], 0.0, dtype=tl.float32)
    offs_m = tl.arange(0, BLOCK_M)
    for start in range(0, Tq, BLOCK_M):
        rows = start + offs_m
        row_ok = rows < Tq
        q = load_tile(q_base + rows[:, None] * sqt + offs_d[None, :], row_ok, d_ok, True, HEAD_DIM == BLOCK_D)
        lse = tl.load(lse_base + rows * slt, mask=row_ok, other=float("inf"))  # rows past Tq: p = 0
        s = mma(k, tl.trans(q), None, DOT_PRECISION) * scale_log2  # [BLOCK_N, BLOCK_M]: keys on the rows
        acc += reduce_sum(tl.math.exp2(s - lse[None, :]), 1)
    tl.store(Out + pid_bh * sob + cols * sot, acc * inv_rows, mask=col_ok)


def _configs(shapes):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


# (BLOCK_M, BLOCK_N, warps, stages): one [BLOCK_M, BLOCK_D] query (or key) tile stays in registers per program
_lse_tuned = triton.autotune(
    configs=_configs([(128, 64, 8, 2), (128, 64, 4, 3), (64, 64, 4, 2), (128, 128, 8, 2), (64, 32, 4, 2)]),
    key=["HEAD_DIM", "GROUP", "DOT_PRECISION"])(_lse_kernel)
_column_tuned = triton.autotune(
    configs=_configs([(64, 128, 8, 2), (64, 128, 4, 3), (64, 64, 4, 2), (128, 128, 8, 2), (32, 64, 4, 2)]),
    key=["HEAD_DIM", "GROUP", "DOT_PRECISION"])(_column_kernel)


def _dot_precision(q):
    """fp32 in full precision; 16-bit inputs on tensor cores, upcast under the CPU interpreter (its bf16 dot is
    wrong).  Read from the device, not from the environment at import time."""
    if q.dtype == torch.float32:
        return "ieee"
    return "tf32" if q.is_cuda else "upcast"


def forward(q, k, scale, options):
    """Launch both passes: ``[B, Hq, Tk]`` float32, the mean over the ``Tq`` query rows of each key's softmax
    probability."""
    q, k = last_dim_contiguous(q), last_dim_contiguous(k)
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    poison = options.poison_outputs
    lse = _alloc.empty((B * Hq, Tq), torch.float32, q.device, poison)
    out = _alloc.empty((B * Hq, Tk), torch.float32, q.device, poison)
    consts = {"GROUP": Hq // Hkv, "HEAD_DIM": D, "BLOCK_D": max(16, triton.next_power_of_2(D)),
                  "DOT_PRECISION": _dot_precision(q)}
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), lse.stride(0),
               lse.stride(1))
    bm, bn = interpreter_tiles(64, 64, options)
    launch(_lse_tuned, lambda meta: (B * Hq, triton.cdiv(Tq, meta["BLOCK_M"])),
           (q, k, lse, scale * LOG2E, *strides, Hq, Tq, Tk), consts, {"BLOCK_M": bm, "BLOCK_N": bn}, q.device,
           options.autotune)
    launch(_column_tuned, lambda meta: (B * Hq, triton.cdiv(Tk, meta["BLOCK_N"])),
           (q, k, lse, out, scale * LOG2E, 1.0 / Tq, *strides, out.stride(0), out.stride(1), Hq, Tq, Tk), consts,
           {"BLOCK_M": bm, "BLOCK_N": bn}, q.device, options.autotune)
    return out.view(B, Hq, Tk)
