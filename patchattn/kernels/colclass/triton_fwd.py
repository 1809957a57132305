"""Triton forward of class-mass attention: one pass over each query tile's causal keys.

One program = one (batch, q head, query tile of BLOCK_M rows).  It walks the key tiles from the block holding the
row's ``kv_start`` to the tile's last causal key, with one running max ``m`` over every visible key and, rescaled
together when ``m`` grows (online softmax): the row's sum ``l`` over all keys, the sums ``l_c`` over the keys of
class bits 0, 1 and 2, and two accumulators, ``sum p_j v_j`` over bit-0 keys and over bit-1 keys.  Scores are in
log2 units (exp2), as in the block-sparse engine, whose tile loads, matmul, reductions and visibility mask are
reused (:mod:`patchattn.kernels.blocksparse.triton_fwd`).  Forward only.
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
    visibility,
)

FEW_ROWS = 16  # decode-sized calls (Tq <= this) take 16-row tiles: a bigger tile would be mostly masked rows


@triton.jit
def _masked_sum(p, member):
    return reduce_sum(tl.where(member[None, :], p, 0.0), 1)


@triton.jit
def _class_kernel(
        Q, K, V, Classes, KvStart, Mass, Normalised, Weighted, scale_log2,
        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, scb, sct,
        smb, smh, smt, snb, snh, snt, swb, swh, swt,
        Hq, Tq, Tk,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_PAD: tl.constexpr,
        FEW: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh = tl.program_id(0)
    tile = tl.num_programs(1) - 1 - tl.program_id(1)  # heavy (late, causal) tiles first
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    b, h, rows, row_ok, rows_pos, offs_d, d_ok, q = query_tile(Q, pid_bh, Hq, tile, sqb, sqh, sqt, Tq, Tk, HEAD_DIM,
                                                               BLOCK_D, BLOCK_M)
    k_base = K + b * skb + (h // GROUP) * skh
    v_base = V + b * svb + (h // GROUP) * svh
    class_base = Classes + b * scb

    kv_lo = 0
    if HAS_PAD:
        kv_lo = tl.load(KvStart + b)
    kv_end = tl.minimum(tile * BLOCK_M + BLOCK_M, Tq) + (Tk - Tq)  # one past the tile's last causal key
    first = (kv_lo // BLOCK_N) * BLOCK_N  # tiles wholly before kv_start are never loaded

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_all = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    l_0 = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    l_1 = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    l_2 = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc_0 = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    acc_1 = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(first, kv_end, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < Tk
        k = load_tile(k_base + cols[:, None] * skt + offs_d[None, :], col_ok, d_ok, True, EVEN_D)
        s = mma(q, tl.trans(k), None, DOT_PRECISION) * scale_log2
        s = tl.where(visibility(rows_pos, cols, kv_lo, Tk, True, False), s, float("-inf"))
        code = tl.load(class_base + cols * sct, mask=col_ok, other=0).to(tl.int32)
        m_new = tl.maximum(m_i, reduce_max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        in_0 = (code & 1) != 0
        in_1 = (code & 2) != 0
        l_all = l_all * alpha + reduce_sum(p, 1)
        l_0 = l_0 * alpha + _masked_sum(p, in_0)
        l_1 = l_1 * alpha + _masked_sum(p, in_1)
        l_2 = l_2 * alpha + _masked_sum(p, (code & 4) != 0)
        v = load_tile(v_base + cols[:, None] * svt + offs_d[None, :], col_ok, d_ok, True, EVEN_D)
        acc_0 = mma(tl.where(in_0[None, :], p, 0.0).to(v.dtype), v, acc_0 * alpha[:, None], DOT_PRECISION)
        acc_1 = mma(tl.where(in_1[None, :], p, 0.0).to(v.dtype), v, acc_1 * alpha[:, None], DOT_PRECISION)
        m_i = m_new

    total = tl.where(l_all > 0.0, l_all, 1.0)  # a row that sees no key: every sum is 0, so every output is 0
    mass_ptr = Mass + b * smb + h * smh + rows * smt
    tl.store(mass_ptr, l_0 / total, mask=row_ok)
    tl.store(mass_ptr + 1, l_1 / total, mask=row_ok)
    tl.store(mass_ptr + 2, l_2 / total, mask=row_ok)
    out_mask = row_ok[:, None] & d_ok[None, :]
    normalised = acc_0 / tl.where(l_0 > 0.0, l_0, 1.0)[:, None]
    tl.store(Normalised + b * snb + h * snh + rows[:, None] * snt + offs_d[None, :], normalised, mask=out_mask)
    weighted = acc_1 / total[:, None]
    tl.store(Weighted + b * swb + h * swh + rows[:, None] * swt + offs_d[None, :], weighted, mask=out_mask)


def _configs():
    """A few shapes: two [BLOCK_M, BLOCK_D] fp32 accumulators live per program, so tiles stay at most 128 x 64."""
    shapes = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 2), (32, 64, 4, 2), (128, 64, 8, 2), (16, 64, 4, 2),
              (16, 32, 4, 2), (16, 128, 4, 2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def prune_configs(configs, named_args, **kwargs):
    """16-row tiles for decode-sized calls, wider ones otherwise; head_dim 256 keeps the smaller key tiles."""
    few = [c for c in configs if (c.kwargs["BLOCK_M"] == 16) == kwargs["FEW"]]
    fits = [c for c in few if kwargs["BLOCK_D"] <= 128 or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 32]
    return fits or few or configs[-1:]


_class_tuned = triton.autotune(configs=_configs(), key=["HEAD_DIM", "GROUP", "HAS_PAD", "FEW"],
                               prune_configs_by={"early_config_prune": prune_configs})(_class_kernel)


def _dot_precision(q):
    """fp32 in full precision; 16-bit inputs on tensor cores, upcast under the CPU interpreter (its bf16 dot is
    wrong).  Read from the device, not from the environment at import time."""
    if q.dtype == torch.float32:
        return "ieee"
    return "tf32" if q.is_cuda else "upcast"


def forward(q, k, v, classes, kv_start, scale, options):
    """Launch the kernel: ``(mass [B, Hq, Tq, 3], normalised [B, Hq, Tq, D], weighted [B, Hq, Tq, D])``, fp32."""
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    poison = options.poison_outputs
    mass = _alloc.empty((B, Hq, Tq, 3), torch.float32, q.device, poison)
    normalised = _alloc.empty((B, Hq, Tq, D), torch.float32, q.device, poison)
    weighted = _alloc.empty((B, Hq, Tq, D), torch.float32, q.device, poison)
    classes = classes.contiguous()
    starts = kv_start.contiguous() if kv_start is not None else classes  # never read without HAS_PAD
    args = (q, k, v, classes, starts, mass, normalised, weighted, scale * LOG2E,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), classes.stride(0), classes.stride(1),
            mass.stride(0), mass.stride(1), mass.stride(2), normalised.stride(0), normalised.stride(1),
            normalised.stride(2), weighted.stride(0), weighted.stride(1), weighted.stride(2), Hq, Tq, Tk)
    few = Tq <= FEW_ROWS
    consts = dict(GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
                  HAS_PAD=kv_start is not None, FEW=few, DOT_PRECISION=_dot_precision(q))
    bm, bn = interpreter_tiles(FEW_ROWS if few else 64, 64, options)

    def grid(meta):
        return (B * Hq, triton.cdiv(Tq, meta["BLOCK_M"]))

    launch(_class_tuned, grid, args, consts, dict(BLOCK_M=bm, BLOCK_N=bn), q.device, options.autotune)
    return mass, normalised, weighted
