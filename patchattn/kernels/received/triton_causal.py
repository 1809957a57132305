"""Triton causal received attention (``act``'s prefill column scores): two passes, no ``Tq x Tk`` tensor.

Query row ``i`` sits at key position ``p_i = off_b + i`` (``off_b = ends[b] - Tq``, or ``Tk - Tq``: the queries are
the last of the keys) and sees key ``j`` when ``start_b <= j <= p_i`` and ``p_i >= start_b`` (``starts``: left
padding) and its given log-sum-exp ``lse_i`` (the engine's, natural log, fp32) is finite.

1. ``_row_kernel``, one program per (batch x head, query tile): ``row_i = sum_j exp(s_ij - lse_i)`` over the key
   tiles up to the tile's last position (causal tiles skipped) and writes the refined ``lse_i + log(row_i)``
   (``act``'s renormalisation: ``-inf`` for a row that sees no key).
2. ``_column_kernel``, one program per (batch x head, key tile): walks the query tiles from the first that can see
   the tile, ``p = 2^(s - refined)`` (the renormalised probabilities; 0 where not seen) summed over the rows, then
   divided by the number of queries whose position is at or after the key, ``min(Tq, Tk - j)``.

Same helpers (tile loads, matmul precision, reductions, launcher) as :mod:`.triton_fwd`.  GQA reads k in place.
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
    reduce_sum,
)
from .triton_fwd import _configs, _dot_precision


@triton.jit
def _bounds(Starts, Ends, b, Tq, Tk, HAS_STARTS: tl.constexpr, HAS_ENDS: tl.constexpr):
    """(first visible key of sequence ``b``, position offset of its query rows)."""
    start = 0
    if HAS_STARTS:
        start = tl.load(Starts + b).to(tl.int32)
    off = Tk - Tq
    if HAS_ENDS:
        off = tl.load(Ends + b).to(tl.int32) - Tq
    return start, off


@triton.jit
def _seen(rows_pos, row_ok, lse, cols, col_ok, start):
    """bool ``[BLOCK_M, BLOCK_N]``: query row sees key (causal, not padding, finite lse, in range)."""
    row_in = row_ok & (rows_pos >= start) & (tl.abs(lse) < float("inf"))  # NaN compares False
    col_in = col_ok & (cols >= start)
    return row_in[:, None] & col_in[None, :] & (cols[None, :] <= rows_pos[:, None])


@triton.jit
def _row_kernel(Q, K, Lse, Refined, Starts, Ends, scale_log2, sqb, sqh, sqt, skb, skh, skt, slb, slt, Hq, Tq, Tk,
                GROUP: tl.constexpr, HAS_STARTS: tl.constexpr, HAS_ENDS: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh = tl.program_id(0)
    tile = tl.program_id(1)
    b, h, rows, row_ok, _, offs_d, d_ok, q = query_tile(Q, pid_bh, Hq, tile, sqb, sqh, sqt, Tq, Tq, HEAD_DIM,
                                                       BLOCK_D, BLOCK_M)
    start, off = _bounds(Starts, Ends, b, Tq, Tk, HAS_STARTS, HAS_ENDS)
    rows_pos = rows + off
    lse = tl.load(Lse + pid_bh * slb + rows * slt, mask=row_ok, other=0.0)
    lse_log2 = tl.where(tl.abs(lse) < float("inf"), lse, 0.0) * 1.4426950408889634
    k_base = K + b * skb + (h // GROUP) * skh
    row = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    lo = (tl.maximum(start, 0) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(Tk, tl.minimum(tile * BLOCK_M + BLOCK_M, Tq) + off)  # one past the tile's newest position
    for begin in range(lo, hi, BLOCK_N):
        cols = begin + offs_n
        col_ok = cols < Tk
        k = load_tile(k_base + cols[:, None] * skt + offs_d[None, :], col_ok, d_ok, True, HEAD_DIM == BLOCK_D)
        s = mma(q, tl.trans(k), None, DOT_PRECISION) * scale_log2
        seen = _seen(rows_pos, row_ok, lse, cols, col_ok, start)
        row += reduce_sum(tl.where(seen, tl.math.exp2(s - lse_log2[:, None]), 0.0), 1)
    log_row = tl.math.log2(tl.where(row > 0.0, row, 1.0)) * 0.6931471805599453
    refined = lse + tl.where(row > 0.0, log_row, float("-inf"))  # -inf: a row that sees no key
    tl.store(Refined + pid_bh * slb + rows * slt, refined, mask=row_ok)


@triton.jit
def _column_kernel(Q, K, Refined, Out, Starts, Ends, scale_log2, sqb, sqh, sqt, skb, skh, skt, slb, slt, sob, sot,
                   Hq, Tq, Tk, GROUP: tl.constexpr, HAS_STARTS: tl.constexpr, HAS_ENDS: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh = tl.program_id(0)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    first = tl.program_id(1) * BLOCK_N
    cols = first + tl.arange(0, BLOCK_N)
    col_ok = cols < Tk
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    start, off = _bounds(Starts, Ends, b, Tq, Tk, HAS_STARTS, HAS_ENDS)
    k = load_tile(K + b * skb + (h // GROUP) * skh + cols[:, None] * skt + offs_d[None, :], col_ok, d_ok, True,
                  HEAD_DIM == BLOCK_D)
    q_base = Q + b * sqb + h * sqh
    lse_base = Refined + pid_bh * slb
    acc = tl.full([BLOCK_N], 0.0, dtype=tl.float32)
    offs_m = tl.arange(0, BLOCK_M)
    lo = (tl.maximum(tl.maximum(first, start) - off, 0) // BLOCK_M) * BLOCK_M  # rows before it see no key here
    for begin in range(lo, Tq, BLOCK_M):
        rows = begin + offs_m
        row_ok = rows < Tq
        q = load_tile(q_base + rows[:, None] * sqt + offs_d[None, :], row_ok, d_ok, True, HEAD_DIM == BLOCK_D)
        refined = tl.load(lse_base + rows * slt, mask=row_ok, other=float("-inf"))
        norm = tl.where(tl.abs(refined) < float("inf"), refined, 0.0) * 1.4426950408889634
        s = mma(k, tl.trans(q), None, DOT_PRECISION) * scale_log2  # [BLOCK_N, BLOCK_M]: keys on the rows
        seen = tl.trans(_seen(rows + off, row_ok, refined, cols, col_ok, start))
        acc += reduce_sum(tl.where(seen, tl.math.exp2(s - norm[None, :]), 0.0), 1)
    count = tl.minimum(Tk - cols, Tq).to(tl.float32)
    tl.store(Out + pid_bh * sob + cols * sot, acc / tl.where(count > 0, count, 1.0), mask=col_ok)


_row_tuned = triton.autotune(
    configs=_configs([(128, 64, 8, 2), (128, 64, 4, 3), (64, 64, 4, 2), (128, 128, 8, 2), (64, 32, 4, 2)]),
    key=["HEAD_DIM", "GROUP", "DOT_PRECISION", "HAS_STARTS", "HAS_ENDS"])(_row_kernel)
_column_tuned = triton.autotune(
    configs=_configs([(64, 128, 8, 2), (64, 128, 4, 3), (64, 64, 4, 2), (128, 128, 8, 2), (32, 64, 4, 2)]),
    key=["HEAD_DIM", "GROUP", "DOT_PRECISION", "HAS_STARTS", "HAS_ENDS"])(_column_kernel)


def forward(q, k, lse, starts, ends, scale, options, columns: bool = True):
    """Launch the passes: (refined lse ``[B, Hq, Tq]``, column scores ``[B, Hq, Tk]`` or None), float32."""
    q, k = last_dim_contiguous(q), last_dim_contiguous(k)
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    lse_in = lse.to(torch.float32).reshape(B * Hq, Tq).contiguous()
    refined = _alloc.empty((B * Hq, Tq), torch.float32, q.device, options.poison_outputs)
    dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
    starts_t = dummy if starts is None else starts.to(device=q.device, dtype=torch.int32).contiguous()
    ends_t = dummy if ends is None else ends.to(device=q.device, dtype=torch.int32).contiguous()
    consts = {"GROUP": Hq // Hkv, "HAS_STARTS": starts is not None, "HAS_ENDS": ends is not None, "HEAD_DIM": D,
              "BLOCK_D": max(16, triton.next_power_of_2(D)), "DOT_PRECISION": _dot_precision(q)}
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), refined.stride(0),
               refined.stride(1))
    bm, bn = interpreter_tiles(64, 64, options)
    launch(_row_tuned, lambda meta: (B * Hq, triton.cdiv(Tq, meta["BLOCK_M"])),
           (q, k, lse_in, refined, starts_t, ends_t, scale * LOG2E, *strides, Hq, Tq, Tk), consts,
           {"BLOCK_M": bm, "BLOCK_N": bn}, q.device, options.autotune)
    if not columns:
        return refined.view(B, Hq, Tq), None
    out = _alloc.empty((B * Hq, Tk), torch.float32, q.device, options.poison_outputs)
    launch(_column_tuned, lambda meta: (B * Hq, triton.cdiv(Tk, meta["BLOCK_N"])),
           (q, k, refined, out, starts_t, ends_t, scale * LOG2E, *strides, out.stride(0), out.stride(1), Hq, Tq,
            Tk), consts, {"BLOCK_M": bm, "BLOCK_N": bn}, q.device, options.autotune)
    return refined.view(B, Hq, Tq), out.view(B, Hq, Tk)
