"""Triton backward kernels for block-sparse flash attention.

* dK/dV: one program per (batch, kv head, key tile); walks the *transposed* list (which query
  blocks read this key block, built on the device by a stable sort, O(entries) memory) for every
  q head of the GQA group (heads that share one list as one walk over (entry, head) pairs, ``GROUP_WALK``), so
  repeated keys are never materialised and dK/dV need no atomics.
* dQ, two ways (``MODE``, env ``PATCHATTN_BWD``):
  - ``split`` (default): a second kernel, one program per (batch, q head, query tile), walks the
    forward's list and recomputes P and dP (FlashAttention-2's deterministic variant).
  - ``fused``: the dK/dV pass also forms dS @ K for each (key tile, query tile) pair it visits and
    adds it into an fp32 dQ buffer with atomics (FlashAttention-2's original backward): 5 matrix
    products per tile pair instead of 7, but on the H200 the element-wise fp32 atomics cost more
    than the products saved (equal at full density, 10-14% slower at 10%: bench/kernel/RESULTS.md),
    and dQ's last bits vary between runs. Kept for measurement and for GPUs with cheaper atomics.
All recompute P = exp2(S - lse) from the forward's logsumexp; delta = rowsum(dO * O) is formed by the split
mode's dQ pass, which runs first and holds dO already (``FUSE_DELTA``), else by a small kernel of its own. A gain
applied in the forward is folded into dO; rows that were inactive or saw no key carry lse = -inf, read here as +inf
so their P is exactly 0.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from . import _alloc
from ._memo import ListMemo
from .triton_fwd import (
    dot_precision,
    hook_args,
    hopper_or_newer,
    interpreter_tiles,
    last_dim_contiguous,
    launch,
    list_ranges,
    list_strides,
    load_tile,
    mma,
    one_loop_from_env,
    pad_bounds,
    reduce_max,
    reduce_sum,
    scores_log2,
    softmax_scales,
    visibility,
)

LOG2E = 1.4426950408889634
MODES = ("fused", "split")
MODE = os.environ.get("PATCHATTN_BWD", "split")
# One pipelined loop per list (per head in the dK/dV pass), masking by a branch, as the forward does (PATCHATTN_BWD_LOOPS
# "1"), or a loop per stretch ("3": up to 8 loops per dK/dV program, each with its own pipeline fill).  H200, d128,
# split mode: one loop 5-13% faster at 16k and 64k, 2-100% density (bench/kernel/one_loop/bwd_ab.*).
BWD_ONE_LOOP = one_loop_from_env("PATCHATTN_BWD_LOOPS", "1")
# How the dK/dV pass walks each head's transposed list: "one" pipelined loop with the diagonal (masked) entries behind
# a branch, or "two" pipelined loops (masked prefix, clean rest). The branch keeps the mask's operands live through the
# whole loop: at 64x128 tiles ptxas spills ~16 registers around every iteration's products, which the clean loop of
# "two" does not. H200 (bench/kernel/delta_d64/run7/walk_ab.json): at head_dim 128 "two" is 3-8% faster at 50% density,
# 1-2% at 10%, 2.5% slower at 2%; at head_dim 64 (no spills) "one" is 4-10% faster; an unpipelined masked prefix
# ("peel" there) never won and was removed. "auto": "two" from head_dim 128 up, "one" below.
DKDV_WALKS = ("auto", "one", "two")
DKDV_WALK = os.environ.get("PATCHATTN_BWD_DKDV_WALK", "auto")
# The fused mode's dQ: TMA bulk reduce-add of each [BLOCK_M, D] tile on Hopper and newer (FlashAttention-3's way), or
# element-wise fp32 atomics ("0", and always on older GPUs / under the interpreter, which has no descriptor reductions).
DQ_TMA = os.environ.get("PATCHATTN_BWD_DQ_TMA", "1") != "0"
# The transposed lists of a live list tensor are built once and reused (static patterns share one list tensor across
# layers and steps, as FlexAttention's BlockMask carries its transposed indices); False rebuilds them every call.
CACHE_TRANSPOSED = os.environ.get("PATCHATTN_BWD_CACHE_LISTS", "1") != "0"
_TRANSPOSED = ListMemo()
# The split backward's dQ pass (which runs first and loads dO anyway) also forms delta = rowsum(dO * O) for its rows
# and stores it for the dK/dV pass: one launch and one read of dO fewer than the separate delta kernel ("0" keeps that).
FUSE_DELTA = os.environ.get("PATCHATTN_BWD_FUSE_DELTA", "1") != "0"
# How the dK/dV pass walks the q heads of its GQA group when they share one list (lists per KV head or shared by all
# heads): "flat", one walk over (entry, head) pairs, so the pass has one or two pipelined loops in all instead of one
# or two per head (each with its own pipeline fill, which short sparse lists pay for), or "loop", a walk per head.
# Lists per q head always take "loop". H200, split backward alone, 16k/64k x 100/50/10/2% (bench/kernel/group_walk/):
# "flat" is 0.2-6% faster at head_dim 64 (most at 2%), but 2-6% slower at head_dim 128 except at 2% (the longer walk
# holds more live state where registers are already at 255); "auto" picks "flat" below head_dim 128.
GROUP_WALKS = ("auto", "flat", "loop")
GROUP_WALK = os.environ.get("PATCHATTN_BWD_GROUP_WALK", "auto")
# Launch order of both passes: all tiles of one head together ("tiles": the programs running at once share one head's
# Q/dO (dK/dV pass) or K/V (dQ pass) in L2; ncu at 16k/50%: the dK/dV pass hit L2 47% of the time in "heads" order)
# or all heads of one tile together ("heads"). H200 (bench/kernel/delta_d64/run4): "tiles" 2-5% faster at head_dim
# 128 from 16k/50% up, "heads" up to 3.5% faster at head_dim 64 and 16k; "auto" picks by head_dim.
ORDERS = ("auto", "heads", "tiles")
BWD_ORDER = os.environ.get("PATCHATTN_BWD_ORDER", "auto")
BWD_TILES_FASTEST: bool | None = {"tiles": True, "heads": False}.get(BWD_ORDER)  # None: by head_dim


# ---------------------------------------------------------------------------------------------
# Transposed block lists
# ---------------------------------------------------------------------------------------------
def cached_transpose_lists(kv_indices, kv_counts, Tq, Tk, opts):
    """:func:`transpose_lists`, remembered per live list pair while unmodified (``_memo.ListMemo``, as the
    dense-fallback check; no host sync)."""
    if not CACHE_TRANSPOSED or (kv_indices.is_cuda and torch.cuda.is_current_stream_capturing()):
        return transpose_lists(kv_indices, kv_counts, Tq, Tk, opts)
    return _TRANSPOSED.get(kv_indices, kv_counts, (Tq, Tk, opts.block_q, opts.block_k, opts.causal),
                           lambda: transpose_lists(kv_indices, kv_counts, Tq, Tk, opts))


def transpose_lists(kv_indices, kv_counts, Tq, Tk, opts):
    """Per (B', H', key block): the sorted query blocks that read it, as CSR.

    Returns (q_ids int32 [entries], offsets int32 [B' * H' * NK + 1]). Entries that are out of
    range or causally invisible are dropped. No host synchronisation.
    """
    Bp, Hp, n_q, width = kv_indices.shape
    n_k = math.ceil(Tk / opts.block_k)
    dev = kv_indices.device
    blk = kv_indices.long()
    keep = (torch.arange(width, device=dev) < kv_counts[..., None]) & (blk >= 0) & (blk < n_k)
    if opts.causal:
        m = torch.arange(n_q, device=dev)
        last_pos = torch.clamp((m + 1) * opts.block_q, max=Tq) - 1 + (Tk - Tq)
        keep &= blk * opts.block_k <= last_pos[:, None]
    n_rows = Bp * Hp * n_k
    head_row = (torch.arange(Bp, device=dev)[:, None] * Hp + torch.arange(Hp, device=dev)) * n_k
    row = torch.where(keep, head_row[:, :, None, None] + blk, n_rows).flatten()
    sorted_rows, order = torch.sort(row, stable=True)
    q_blocks = torch.arange(n_q, device=dev, dtype=torch.int32)[None, None, :, None]
    q_ids = q_blocks.expand(Bp, Hp, n_q, width).flatten()[order].contiguous()
    # Segment starts by binary search (bincount would need a host sync to size its output).
    bounds = torch.arange(n_rows + 1, device=dev, dtype=sorted_rows.dtype)
    offsets = torch.searchsorted(sorted_rows, bounds).to(torch.int32)
    return q_ids, offsets


# ---------------------------------------------------------------------------------------------
# delta = rowsum(dO * O), fused (no fp32 copies of dO and O)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _delta_kernel(O, DO, Delta, sob, soh, sot, sdb, sdh, sdt, Hq, Tq,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    pid_bh = tl.program_id(0)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    rows = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < Tq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * sob + h * soh + rows[:, None] * sot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdt + offs_d[None, :], mask=mask,
                 other=0.0)
    delta = reduce_sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * Tq + rows, delta, mask=rows < Tq)


def row_dot(out, d_out):
    """rowsum(d_out * out) in fp32, [B, Hq, Tq]."""
    B, Hq, Tq, D = out.shape
    delta = _alloc.empty((B, Hq, Tq), torch.float32, out.device)
    block_t = 64
    _delta_kernel[(B * Hq, triton.cdiv(Tq, block_t))](
        out, d_out, delta, *out.stride()[:3], *d_out.stride()[:3], Hq, Tq, HEAD_DIM=D,
        BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_T=block_t)
    return delta


# ---------------------------------------------------------------------------------------------
# dQ
# ---------------------------------------------------------------------------------------------
@triton.jit
def _program_ids(TILES_FASTEST: tl.constexpr):
    """(head program, tile program, tile programs) from a (tiles, heads) or a (heads, tiles) grid."""
    if TILES_FASTEST:
        return tl.program_id(1), tl.program_id(0), tl.num_programs(0)
    return tl.program_id(0), tl.program_id(1), tl.num_programs(1)


@triton.jit
def _dq_range(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, list_ptr, stride_entry,
              j_lo, j_hi, rows_pos, kv_lo, kv_hi, Tk, bias_ptr, stride_bias_t, scale_log2,
              scale_over_cap, cap_log2, offs_d, d_ok,
              BK: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
              DOT_PRECISION: tl.constexpr, clean_lo=0, clean_hi=0, ONE_LOOP: tl.constexpr = False):
    """dQ over list entries j_lo..j_hi; ONE_LOOP masks only the entries outside clean_lo..clean_hi (as the
    forward's _attend)."""
    SUB: tl.constexpr = BK // BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    for j in range(j_lo, j_hi):
        blk = tl.load(list_ptr + (j // SUB) * stride_entry)
        cols = blk * BK + (j % SUB) * BLOCK_N + offs_n
        col_ok = cols < Tk
        k = load_tile(k_base + cols[:, None] * stride_kt + offs_d[None, :], col_ok, d_ok,
                      MASKED, EVEN_D)
        v = load_tile(v_base + cols[:, None] * stride_vt + offs_d[None, :], col_ok, d_ok,
                      MASKED, EVEN_D)
        s, t = scores_log2(q, k, cols, bias_ptr, stride_bias_t, Tk, scale_log2, scale_over_cap,
                           cap_log2, HAS_SOFTCAP, HAS_BIAS, MASKED, DOT_PRECISION, False)
        if ONE_LOOP:
            if (j < clean_lo) | (j >= clean_hi):
                s = tl.where(visibility(rows_pos, cols, kv_lo, kv_hi, CAUSAL, False), s, float("-inf"))
        elif MASKED:
            s = tl.where(visibility(rows_pos, cols, kv_lo, kv_hi, CAUSAL, False), s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        dp = mma(do, tl.trans(v), None, DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = mma(ds.to(k.dtype), k, dq, DOT_PRECISION)
    return dq


@triton.jit
def _dq_kernel(
        Q, K, V, DO, DQ, Lse, Delta, O, KvIdx, KvCnt, KvStart, KvEnd, Bias, Gain, Active,
        scale_log2, scale_over_cap, cap_log2, scale,
        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt, sgqb, sgqh, sgqt, sob, soh, sot,
        sib, sih, siq, sik, scb, sch, scq, sbb, sbh, sbt, sgb, sgt, sgh, sab, sat, sah,
        Hq, Tq, Tk,
        GROUP: tl.constexpr, LIST_DIV: tl.constexpr, BIAS_DIV: tl.constexpr,
        BQ: tl.constexpr, BK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, HAS_GAIN: tl.constexpr, HAS_ACTIVE: tl.constexpr,
        DOT_PRECISION: tl.constexpr, SCAN: tl.constexpr, ONE_LOOP: tl.constexpr, FUSE_DELTA: tl.constexpr,
        TILES_FASTEST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh, tile, n_tiles = _program_ids(TILES_FASTEST)
    tile = n_tiles - 1 - tile  # heavy (late, causal) query tiles first
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Tq
    rows_pos = rows + (Tk - Tq)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = load_tile(Q + b * sqb + h * sqh + rows[:, None] * sqt + offs_d[None, :], row_ok, d_ok,
                  True, EVEN_D)
    do = load_tile(DO + b * sdb + h * sdh + rows[:, None] * sdt + offs_d[None, :], row_ok, d_ok,
                   True, EVEN_D)
    lse2 = tl.load(Lse + pid_bh.to(tl.int64) * Tq + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
    lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)
    if FUSE_DELTA:  # rows of O are written by this program only: form delta here, store it for the dK/dV pass
        o = load_tile(O + b * sob + h * soh + rows[:, None] * sot + offs_d[None, :], row_ok, d_ok, True, EVEN_D)
        delta = reduce_sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(Delta + pid_bh.to(tl.int64) * Tq + rows, delta, mask=row_ok)
    else:
        delta = tl.load(Delta + pid_bh.to(tl.int64) * Tq + rows, mask=row_ok, other=0.0)
    k_base = K + b * skb + (h // GROUP) * skh
    v_base = V + b * svb + (h // GROUP) * svh
    bias_ptr = Bias + b * sbb + (h // BIAS_DIV) * sbh

    kv_lo = 0
    kv_hi = Tk
    if HAS_PAD:
        kv_lo = tl.load(KvStart + b)
        kv_hi = tl.minimum(tl.load(KvEnd + b), Tk)
    m_blk = tile * BLOCK_M // BQ
    list_ptr = KvIdx + b * sib + (h // LIST_DIV) * sih + m_blk * siq
    count = tl.load(KvCnt + b * scb + (h // LIST_DIV) * sch + m_blk * scq)
    if HAS_ACTIVE:
        act = tl.load(Active + b * sab + rows * sat + h * sah, mask=row_ok, other=0) != 0
        count = tl.where(reduce_max(act.to(tl.int32), 0) > 0, count, 0)
    first_pos = tile * BLOCK_M + (Tk - Tq)
    last_pos = tl.minimum(tile * BLOCK_M + BLOCK_M, Tq) - 1 + (Tk - Tq)
    if CAUSAL:
        full_lim = tl.minimum(first_pos + 1, kv_hi)
        part_lim = tl.minimum(last_pos + 1, kv_hi)
    else:
        full_lim = kv_hi
        part_lim = kv_hi
    n_before, n_lo, n_full, n_vis = list_ranges(list_ptr, sik, count, kv_lo, full_lim, part_lim,
                                                BK, SCAN)
    clean_hi = tl.maximum(n_lo, n_full)
    SUB: tl.constexpr = BK // BLOCK_N

    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    if ONE_LOOP:
        dq = _dq_range(dq, q, do, lse2, delta, k_base, v_base, skt, svt, list_ptr, sik, n_before * SUB,
                       n_vis * SUB, rows_pos, kv_lo, kv_hi, Tk, bias_ptr, sbt, scale_log2, scale_over_cap, cap_log2,
                       offs_d, d_ok, BK, BLOCK_N, EVEN_D, True, CAUSAL, HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION,
                       n_lo * SUB, clean_hi * SUB, True)
    else:
        dq = _dq_range(dq, q, do, lse2, delta, k_base, v_base, skt, svt, list_ptr, sik, n_before * SUB,
                       tl.minimum(n_lo, n_vis) * SUB, rows_pos, kv_lo, kv_hi, Tk, bias_ptr, sbt,
                       scale_log2, scale_over_cap, cap_log2, offs_d, d_ok, BK, BLOCK_N, EVEN_D, True,
                       CAUSAL, HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION)
        dq = _dq_range(dq, q, do, lse2, delta, k_base, v_base, skt, svt, list_ptr, sik, n_lo * SUB,
                       clean_hi * SUB, rows_pos, kv_lo, kv_hi, Tk, bias_ptr, sbt, scale_log2,
                       scale_over_cap, cap_log2, offs_d, d_ok, BK, BLOCK_N, EVEN_D, False, CAUSAL,
                       HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION)
        dq = _dq_range(dq, q, do, lse2, delta, k_base, v_base, skt, svt, list_ptr, sik, clean_hi * SUB,
                       n_vis * SUB, rows_pos, kv_lo, kv_hi, Tk, bias_ptr, sbt, scale_log2,
                       scale_over_cap, cap_log2, offs_d, d_ok, BK, BLOCK_N, EVEN_D, True, CAUSAL,
                       HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION)
    dq_ptrs = DQ + b * sgqb + h * sgqh + rows[:, None] * sgqt + offs_d[None, :]
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# ---------------------------------------------------------------------------------------------
# dK / dV
# ---------------------------------------------------------------------------------------------
@triton.jit
def _count_q_blocks_before(q_ids, lo, hi, limit, offset, BQ: tl.constexpr, SCAN: tl.constexpr):
    """How many query blocks in q_ids[lo:hi] start (in key positions) before ``limit``."""
    n = lo * 0
    for c in range(lo, hi, SCAN):
        offs = c + tl.arange(0, SCAN)
        ok = offs < hi
        first = tl.load(q_ids + offs, mask=ok, other=0) * BQ + offset
        n += reduce_sum((ok & (first < limit)).to(tl.int32), 0)
    return n


@triton.jit
def _dkdv_range(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_target, dq_batch, dq_head, stride_qt,
                stride_dt, stride_dqt, q_ids, j_lo, j_hi, cols, kv_lo, kv_hi, Tq, Tk, bias_ptr, stride_bias_t,
                scale_log2, scale_over_cap, cap_log2, offs_d, d_ok,
                BQ: tl.constexpr, BLOCK_M: tl.constexpr, EVEN_D: tl.constexpr,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, FUSED_DQ: tl.constexpr,
                DQ_TMA: tl.constexpr, masked_below, ONE_LOOP: tl.constexpr, HEADS: tl.constexpr, head_strides):
    """dK/dV over transposed-list entries j_lo..j_hi; ONE_LOOP masks only the entries below masked_below.

    With HEADS > 1, j walks (entry, head) pairs, the head fastest, for HEADS consecutive q heads that share the list:
    ``head_strides`` = (q, dO, lse/delta, dQ, bias) offsets from one head to the next (the bases are the first
    head's; the dQ offset counts heads for a descriptor, elements for a pointer).
    With FUSED_DQ, ``dq_target`` is the fp32 dQ of this (batch, head): a pointer (element-wise atomics) or, with
    DQ_TMA, a [B, Tq, Hq, D] tensor descriptor addressed by (dq_batch, row, dq_head, 0)."""
    SUB: tl.constexpr = BQ // BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    for j in range(j_lo, j_hi):
        g = j % HEADS
        t = j // HEADS
        m = tl.load(q_ids + t // SUB)
        rows = m * BQ + (t % SUB) * BLOCK_M + offs_m
        row_ok = rows < Tq
        q = load_tile(q_base + g * head_strides[0] + rows[:, None] * stride_qt + offs_d[None, :], row_ok, d_ok, True,
                      EVEN_D)
        do = load_tile(do_base + g * head_strides[1] + rows[:, None] * stride_dt + offs_d[None, :], row_ok, d_ok,
                       True, EVEN_D)
        lse2 = tl.load(lse_base + g * head_strides[2] + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
        lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)
        delta = tl.load(delta_base + g * head_strides[2] + rows, mask=row_ok, other=0.0)
        # Transposed tiles [BLOCK_N keys, BLOCK_M queries]: dV and dK come out without transposes.
        s_t, t_t = scores_log2(k, q, cols, bias_ptr + g * head_strides[4], stride_bias_t, Tk, scale_log2,
                               scale_over_cap, cap_log2, HAS_SOFTCAP, HAS_BIAS, True, DOT_PRECISION, True)
        if ONE_LOOP:
            if j < masked_below:
                s_t = tl.where(visibility(rows + (Tk - Tq), cols, kv_lo, kv_hi, CAUSAL, True), s_t, float("-inf"))
        elif MASKED:
            vis = visibility(rows + (Tk - Tq), cols, kv_lo, kv_hi, CAUSAL, True)
            s_t = tl.where(vis, s_t, float("-inf"))
        p_t = tl.math.exp2(s_t - lse2[None, :])
        dv = mma(p_t.to(do.dtype), do, dv, DOT_PRECISION)
        dp_t = mma(v, tl.trans(do), None, DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if HAS_SOFTCAP:
            ds_t = ds_t * (1.0 - t_t * t_t)
        dk = mma(ds_t.to(q.dtype), q, dk, DOT_PRECISION)
        if FUSED_DQ:  # this tile pair's share of dQ = dS @ K, summed over key tiles by atomics
            dq = mma(tl.trans(ds_t).to(k.dtype), k, None, DOT_PRECISION)
            if DQ_TMA:  # one bulk reduce-add of the tile by the TMA unit; rows >= Tq and cols >= D are clipped
                dq_target.atomic_add([dq_batch, m * BQ + (t % SUB) * BLOCK_M, dq_head + g * head_strides[3], 0],
                                     dq.reshape(1, BLOCK_M, 1, dq.shape[1]))
            else:
                tl.atomic_add(dq_target + g * head_strides[3] + rows[:, None] * stride_dqt + offs_d[None, :], dq,
                              mask=row_ok[:, None] & d_ok[None, :], sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_kernel(
        Q, K, V, DO, DK, DV, DQ, Lse, Delta, QIds, Offsets, KvStart, KvEnd, Bias,
        scale_log2, scale_over_cap, cap_log2, scale,
        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,
        sdkb, sdkh, sdkt, sdvb, sdvh, sdvt, sgqb, sgqh, sgqt, sbb, sbh, sbt,
        Hkv, Tq, Tk, list_rows_per_batch, n_k_blocks, n_batch,
        GROUP: tl.constexpr, LIST_DIV: tl.constexpr, BIAS_DIV: tl.constexpr,
        BQ: tl.constexpr, BK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, SCAN: tl.constexpr,
        FUSED_DQ: tl.constexpr, DQ_TMA: tl.constexpr, ONE_LOOP: tl.constexpr, TILES_FASTEST: tl.constexpr,
        FLAT_GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh, n_tile, _n = _program_ids(TILES_FASTEST)  # early key tiles (read by the most queries, causal) first
    b32 = pid_bh // Hkv  # descriptor coordinates are 32-bit
    b = b32.to(tl.int64)
    hkv = pid_bh % Hkv
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    Hq = Hkv * GROUP

    cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < Tk
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    k = load_tile(K + b * skb + hkv * skh + cols[:, None] * skt + offs_d[None, :], col_ok, d_ok,
                  True, EVEN_D)
    v = load_tile(V + b * svb + hkv * svh + cols[:, None] * svt + offs_d[None, :], col_ok, d_ok,
                  True, EVEN_D)
    kv_lo = 0
    kv_hi = Tk
    if HAS_PAD:
        kv_lo = tl.load(KvStart + b)
        kv_hi = tl.minimum(tl.load(KvEnd + b), Tk)
    # The whole tile is masked when it straddles padding or the end of the keys.
    tile_clean = (n_tile * BLOCK_N >= kv_lo) & ((n_tile + 1) * BLOCK_N <= kv_hi)
    n_blk = n_tile * BLOCK_N // BK
    tile_last = n_tile * BLOCK_N + BLOCK_N - 1

    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
    SUB: tl.constexpr = BQ // BLOCK_M
    if DQ_TMA:
        dq_desc = tl.make_tensor_descriptor(DQ, shape=[n_batch, Tq, Hq, HEAD_DIM], strides=[sgqb, sgqt, sgqh, 1],
                                            block_shape=[1, BLOCK_M, 1, BLOCK_D])
    # FLAT_GROUP (the group's heads share one list): one walk over (entry, head) pairs instead of one per head.
    HEADS: tl.constexpr = GROUP if FLAT_GROUP else 1
    WALK: tl.constexpr = SUB * HEADS  # steps per list entry
    steps = (sqh, sdh, Tq, 1 if DQ_TMA else sgqh, sbh if BIAS_DIV == 1 else 0)
    for g in range(0, GROUP, HEADS):
        h = hkv * GROUP + g
        row = b * list_rows_per_batch + (h // LIST_DIV) * n_k_blocks + n_blk
        seg_lo = tl.load(Offsets + row)
        seg_hi = tl.load(Offsets + row + 1)
        if CAUSAL:  # query blocks whose first row cannot see the tile's last key: a prefix
            n_diag = _count_q_blocks_before(QIds, seg_lo, seg_hi, tile_last, Tk - Tq, BQ, SCAN)
        else:
            n_diag = seg_lo * 0
        n_diag = tl.where(tile_clean, n_diag, seg_hi - seg_lo)
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdb + h * sdh
        lse_base = Lse + (b * Hq + h) * Tq
        delta_base = Delta + (b * Hq + h) * Tq
        if DQ_TMA:
            dq_target = dq_desc
        else:
            dq_target = DQ + b * sgqb + h * sgqh
        bias_ptr = Bias + b * sbb + (h // BIAS_DIV) * sbh
        if ONE_LOOP:  # one pipelined walk, the masked prefix picked by a branch
            dk, dv = _dkdv_range(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_target, b32, h, sqt,
                                 sdt, sgqt, QIds, seg_lo * WALK, seg_hi * WALK, cols, kv_lo, kv_hi,
                                 Tq, Tk, bias_ptr, sbt, scale_log2, scale_over_cap, cap_log2, offs_d,
                                 d_ok, BQ, BLOCK_M, EVEN_D, True, CAUSAL, HAS_BIAS, HAS_SOFTCAP,
                                 DOT_PRECISION, FUSED_DQ, DQ_TMA, (seg_lo + n_diag) * WALK, True, HEADS, steps)
        else:
            dk, dv = _dkdv_range(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_target, b32, h, sqt,
                                 sdt, sgqt, QIds, seg_lo * WALK, (seg_lo + n_diag) * WALK, cols, kv_lo, kv_hi,
                                 Tq, Tk, bias_ptr, sbt, scale_log2, scale_over_cap, cap_log2, offs_d,
                                 d_ok, BQ, BLOCK_M, EVEN_D, True, CAUSAL, HAS_BIAS, HAS_SOFTCAP,
                                 DOT_PRECISION, FUSED_DQ, DQ_TMA, 0, False, HEADS, steps)
            dk, dv = _dkdv_range(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_target, b32, h, sqt,
                                 sdt, sgqt, QIds, (seg_lo + n_diag) * WALK, seg_hi * WALK, cols, kv_lo, kv_hi,
                                 Tq, Tk, bias_ptr, sbt, scale_log2, scale_over_cap, cap_log2, offs_d,
                                 d_ok, BQ, BLOCK_M, EVEN_D, False, CAUSAL, HAS_BIAS, HAS_SOFTCAP,
                                 DOT_PRECISION, FUSED_DQ, DQ_TMA, 0, False, HEADS, steps)
    mask = col_ok[:, None] & d_ok[None, :]
    tl.store(DK + b * sdkb + hkv * sdkh + cols[:, None] * sdkt + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + b * sdvb + hkv * sdvh + cols[:, None] * sdvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------------------------
def _configs(shapes):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in shapes]


# Shared memory a backward config may plan for with 4-byte inputs at head_dim >= 256 (H100/H200: 227 KB a block).
FP32_WIDE_SMEM = 200 * 1024


def _smem_estimate(cfg, block_d, elem_bytes):
    """Bytes of shared memory a pass plans for: the two tiles it holds (K, V or Q, dO) plus its num_stages-deep
    buffers of the two it streams; the larger of the dQ and dK/dV passes."""
    m, n, stages = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_stages
    return elem_bytes * block_d * 2 * max(n + m * stages, m + n * stages)


def _prune(configs, named_args, **kwargs):
    bq, bk, d = kwargs["BQ"], kwargs["BK"], kwargs["BLOCK_D"]
    fits = [c for c in configs if c.kwargs["BLOCK_M"] <= bq and c.kwargs["BLOCK_N"] <= bk
            and (d <= 128 or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64)]
    if kwargs.get("DOT_PRECISION") == "ieee" and d >= 256:
        # fp32 at head_dim 256 overflows every larger tile, and each overflowing config costs a long compile before
        # it fails (> 280 s in all on the H200): keep the ones that can fit.
        fits = [c for c in fits if _smem_estimate(c, d, 4) <= FP32_WIDE_SMEM]
    return fits[:4] or [configs[-1]]


_TUNE_KEY = ["HEAD_DIM", "BQ", "BK", "CAUSAL", "HAS_PAD", "HAS_BIAS", "GROUP"]
_DKDV_CONFIGS = [(64, 128, 8, 3), (32, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 2), (32, 64, 4, 2),
                 (16, 16, 4, 2)]
_dq_tuned = triton.autotune(
    configs=_configs([(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 2),
                      (64, 32, 4, 2), (16, 16, 4, 2)]),
    key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune})(_dq_kernel)
_dkdv_tuned = triton.autotune(
    configs=_configs(_DKDV_CONFIGS), key=_TUNE_KEY,
    prune_configs_by={"early_config_prune": _prune})(_dkdv_kernel)
# The fused pass accumulates into DQ, so every timing run of the autotuner starts from zeros.
_dkdv_fused_tuned = triton.autotune(
    configs=_configs(_DKDV_CONFIGS), key=_TUNE_KEY, reset_to_zero=["DQ"],
    prune_configs_by={"early_config_prune": _prune})(_dkdv_kernel)


def backward(d_out, q, k, v, out, lse, kv_indices, kv_counts, opts, kv_start, kv_end, col_bias,
             head_gain, active, mode: str | None = None):
    """Gradients (dq, dk, dv) of block-sparse attention given the forward's out and lse.

    ``mode``: "fused" (dQ by atomics in the dK/dV pass) or "split" (a separate dQ pass); default ``MODE``.
    """
    mode = MODE if mode is None else mode
    if mode not in MODES:
        raise ValueError(f"backward mode {mode!r}: expected one of {MODES} (env PATCHATTN_BWD)")
    if BWD_ORDER not in ORDERS:
        raise ValueError(f"backward launch order {BWD_ORDER!r}: expected one of {ORDERS} (env PATCHATTN_BWD_ORDER)")
    if DKDV_WALK not in DKDV_WALKS:
        raise ValueError(f"dK/dV walk {DKDV_WALK!r}: expected one of {DKDV_WALKS} (env PATCHATTN_BWD_DKDV_WALK)")
    if GROUP_WALK not in GROUP_WALKS:
        raise ValueError(f"dK/dV group walk {GROUP_WALK!r}: expected one of {GROUP_WALKS} "
                         "(env PATCHATTN_BWD_GROUP_WALK)")
    q, k, v, out, d_out = (last_dim_contiguous(t) for t in (q, k, v, out, d_out))
    B, Hq, Tq, D = q.shape
    fused = mode == "fused"
    # delta = rowsum(dO * O) with the caller's dO: = rowsum(dO_attn * O_attn) even with a gain (see module doc), so the
    # dQ pass can form it only while its dO is the caller's (no gain folded in).
    delta_in_dq = FUSE_DELTA and not fused and head_gain is None
    if delta_in_dq:
        delta = _alloc.empty((B, Hq, Tq), torch.float32, q.device)
    else:
        delta = row_dot(out, d_out)
    if head_gain is not None:
        from .reference import _gain_as_bhtd
        d_out = d_out * _gain_as_bhtd(head_gain).to(d_out.dtype)
    d_out = last_dim_contiguous(d_out)
    kv_start, kv_end = pad_bounds(q, k, kv_start, kv_end)
    hooks = hook_args(q, k, kv_indices, col_bias, None, active, kv_start, kv_end)
    scales = (*softmax_scales(opts), opts.scale)
    # The "auto" launch order, dK/dV walk and group walk all follow head_dim: from 128 up tiles-first, two loops and a
    # walk per head pay (L2 reuse, fewer register spills), below they lose (bench/kernel/delta_d64, group_walk).
    wide_head = D >= 128
    walk = ("two" if wide_head else "one") if DKDV_WALK == "auto" else DKDV_WALK
    consts = dict(hooks["consts"], BQ=opts.block_q, BK=opts.block_k, HEAD_DIM=D,
                  BLOCK_D=max(16, triton.next_power_of_2(D)), CAUSAL=opts.causal,
                  HAS_SOFTCAP=opts.softcap is not None, DOT_PRECISION=dot_precision(q.dtype),
                  SCAN=64, ONE_LOOP=BWD_ONE_LOOP,
                  TILES_FASTEST=wide_head if BWD_TILES_FASTEST is None else BWD_TILES_FASTEST)
    tiles = dict(zip(("BLOCK_M", "BLOCK_N"), interpreter_tiles(opts.block_q, opts.block_k)))
    # dQ in the (B, Tq, Hq, D) layout the attention output uses; fp32 and zeroed when accumulated.
    if fused:
        dq = torch.zeros((B, Tq, Hq, D), dtype=torch.float32, device=q.device).transpose(1, 2)
        dk, dv = _dkdv_pass(q, k, v, d_out, dq, lse, delta, kv_indices, kv_counts, col_bias, opts, hooks,
                            scales, consts, tiles, fused, walk)
    else:
        dq = _alloc.empty((B, Tq, Hq, D), q.dtype, q.device).transpose(1, 2)
        _dq_pass(q, k, v, d_out, dq, lse, delta, out, kv_indices, kv_counts, hooks, scales,
                 dict(consts, FUSE_DELTA=delta_in_dq), tiles)
        dk, dv = _dkdv_pass(q, k, v, d_out, dq, lse, delta, kv_indices, kv_counts, col_bias, opts, hooks,
                            scales, consts, tiles, fused, walk)
    if fused:
        dq = (dq * opts.scale).to(q.dtype)
    return dq, dk, dv


def _dq_pass(q, k, v, d_out, dq, lse, delta, out, kv_indices, kv_counts, hooks, scales, consts, tiles):
    B, Hq, Tq, _ = q.shape
    args = (q, k, v, d_out, dq, lse, delta, out, kv_indices, kv_counts, *hooks["ptrs"], *scales,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *d_out.stride()[:3],
            *dq.stride()[:3], *out.stride()[:3], *list_strides(kv_indices), *list_strides(kv_counts),
            *hooks["strides"], Hq, Tq, k.shape[2])
    launch(_dq_tuned, lambda meta: _grid(B * Hq, triton.cdiv(Tq, meta["BLOCK_M"]), consts), args, consts, tiles,
           q.device)


def _grid(head_programs, tile_programs, consts):
    return (tile_programs, head_programs) if consts["TILES_FASTEST"] else (head_programs, tile_programs)


def _dkdv_pass(q, k, v, d_out, dq, lse, delta, kv_indices, kv_counts, col_bias, opts, hooks, scales,
               consts, tiles, fused, walk):
    B, Hkv, Tk, _ = k.shape
    Tq = q.shape[2]
    q_ids, offsets = cached_transpose_lists(kv_indices, kv_counts, Tq, Tk, opts)
    dk = _alloc.empty(k.shape, k.dtype, k.device)
    dv = _alloc.empty(v.shape, v.dtype, v.device)
    n_k_blocks = math.ceil(Tk / opts.block_k)
    rows_per_batch = 0 if kv_indices.shape[0] == 1 else kv_indices.shape[1] * n_k_blocks
    bias_s = list_strides(col_bias) if col_bias is not None else (0, 0, 0)
    kv_start_p, kv_end_p, bias_p, _gain_p, _act_p = hooks["ptrs"]
    kv_consts = {key: val for key, val in consts.items() if key not in ("HAS_GAIN", "HAS_ACTIVE", "FUSE_DELTA")}
    kv_consts.update(ONE_LOOP=consts["ONE_LOOP"] and walk == "one",
                     FLAT_GROUP=flat_group_walk(consts["GROUP"], consts["LIST_DIV"], q.shape[-1] >= 128))
    args = (q, k, v, d_out, dk, dv, dq, lse, delta, q_ids, offsets, kv_start_p, kv_end_p, bias_p,
            *scales, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *d_out.stride()[:3],
            *dk.stride()[:3], *dv.stride()[:3], *dq.stride()[:3], *bias_s, Hkv, Tq, Tk,
            rows_per_batch, n_k_blocks, B)
    tma = fused and dq_by_tma(q.device, q.shape[-1])
    if tma:
        _ensure_descriptor_allocator()
    launch(_dkdv_fused_tuned if fused else _dkdv_tuned,
           lambda meta: _grid(B * Hkv, triton.cdiv(Tk, meta["BLOCK_N"]), consts), args,
           dict(kv_consts, FUSED_DQ=fused, DQ_TMA=tma), tiles, q.device)
    return dk, dv


def flat_group_walk(group: int, list_div: int, wide_head: bool) -> bool:
    """Whether the dK/dV pass walks its group's heads as one list (``GROUP_WALK``; "auto": below head_dim 128):
    possible when every head of the group reads the same list (one list per KV head, or one for all heads)."""
    shared = group > 1 and list_div % group == 0
    choice = ("loop" if wide_head else "flat") if GROUP_WALK == "auto" else GROUP_WALK
    return shared and choice == "flat"


def dq_by_tma(device, head_dim: int) -> bool:
    """Whether the fused backward adds dQ tiles with TMA bulk reductions (``DQ_TMA``, Hopper or newer, compiled, and
    dQ's row strides a multiple of 16 bytes as TMA needs)."""
    return DQ_TMA and head_dim % 4 == 0 and hopper_or_newer(device)


def _ensure_descriptor_allocator():
    """Device-side tensor descriptors need scratch memory from ``triton.set_allocator``; set a torch-backed one
    unless the caller has set their own."""
    from triton.runtime import _allocation
    current = _allocation._allocator
    current = current.get() if hasattr(current, "get") else current  # a ContextVar in recent Triton
    if isinstance(current, _allocation.NullAllocator):
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
