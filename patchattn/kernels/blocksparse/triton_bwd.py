"""Triton backward kernels for block-sparse flash attention (FlashAttention-2's deterministic two-pass backward).

* dQ: one program per (batch, q head, query tile) walks the forward's list and recomputes P and dP.  It runs first
  and, holding dO already, also forms delta = rowsum(dO * O) for its rows and stores it for the dK/dV pass (a small
  kernel of its own forms delta when a gain is folded into dO).
* dK/dV: one program per (batch, kv head, key tile); walks the *transposed* list (which query blocks read this key
  block, built on the device by a stable sort, O(entries) memory, remembered per live list pair) for every q head of
  the GQA group, so repeated keys are never materialised and dK/dV need no atomics.
Partial tiles: both passes AND an entry's element mask into its scores behind a branch on its tile id (>= 0), as the
forward; the dK/dV pass reads the tile ids transposed with its lists (the same stable sort's order, remembered per
live tile-id tensor beside the transposed lists).
Both walk each list in one pipelined loop with the mask behind a branch, except where the per-shape choices below
(:func:`backward_plan`, measured on the H200) say otherwise.  All recompute P = exp2(S - lse) from the forward's
logsumexp.  A gain applied in the forward is folded into dO; rows that were inactive or saw no key carry lse = -inf,
read here as +inf so their P is exactly 0.

Measured and removed (bench/kernel/RESULTS.md): a loop per stretch of each list (5-13% slower); a fused backward adding
dS @ K into an fp32 dQ inside the dK/dV pass by atomics or TMA reductions (3-13% slower than this split backward at
sparse d128 points); rebuilding the transposed lists every call; a separate delta kernel when the dQ pass can form it.
"""
from __future__ import annotations

import math
import weakref
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import _alloc
from ._memo import ListMemo
from .triton_fwd import (
    apply_tile_mask,
    dot_precision,
    hook_args,
    interpreter_tiles,
    last_dim_contiguous,
    launch,
    list_ranges,
    list_strides,
    load_tile,
    mma,
    pad_bounds,
    query_tile,
    reduce_max,
    reduce_sum,
    scores_log2,
    softmax_scales,
    tile_args,
    visibility,
)

LOG2E = 1.4426950408889634
_TRANSPOSED = ListMemo()


class BackwardPlan(NamedTuple):
    """The backward's per-shape choices (:func:`backward_plan`)."""
    two_loop_dkdv: bool  # the dK/dV pass walks the masked (diagonal) entries in a loop of their own
    flat_group: bool  # the dK/dV pass walks a GQA group sharing one list as one list of (entry, head) pairs
    tiles_fastest: bool  # both passes launch all tiles of one head together (else all heads of one tile)


def backward_plan(head_dim: int, group: int, list_div: int) -> BackwardPlan:
    """Measured on the H200 (bench/kernel/delta_d64, group_walk; bench/kernel/RESULTS.md), all by head_dim:

    * dK/dV walk: one pipelined loop with the diagonal (masked) entries behind a branch keeps the mask's operands live
      through the loop; at 64x128 tiles and head_dim >= 128 ptxas then spills ~16 registers around every iteration's
      products, which a second, clean loop does not: two loops 3-8% faster at 50% density, 1-2% at 10%, 2.5% slower
      at 2%; at head_dim 64 (no spills) one loop is 4-10% faster.
    * GQA group sharing one list (lists per KV head or one for all heads): one walk over (entry, head) pairs, one
      pipeline fill instead of one per head, 0.2-6% faster below head_dim 128, 2-6% slower at 128 (more live state
      where registers are already full).  Lists per q head always walk per head.
    * Launch order: all tiles of one head together share that head's Q/dO (dK/dV) or K/V (dQ) in L2, 2-5% faster at
      head_dim 128 from 16k/50% up; all heads of one tile together up to 3.5% faster at head_dim 64.
    """
    wide = head_dim >= 128
    shared = group > 1 and list_div % group == 0
    return BackwardPlan(two_loop_dkdv=wide, flat_group=shared and not wide, tiles_fastest=wide)


# ---------------------------------------------------------------------------------------------
# Transposed block lists
# ---------------------------------------------------------------------------------------------
def cached_transpose_lists(kv_indices, kv_counts, Tq, Tk, opts):
    """:func:`transpose_lists`, remembered per live list pair while unmodified (``_memo.ListMemo``, as the
    dense-fallback check; no host sync)."""
    if kv_indices.is_cuda and torch.cuda.is_current_stream_capturing():
        return transpose_lists(kv_indices, kv_counts, Tq, Tk, opts)
    return _TRANSPOSED.get(kv_indices, kv_counts, (Tq, Tk, opts.block_q, opts.block_k, opts.causal),
                           lambda: transpose_lists(kv_indices, kv_counts, Tq, Tk, opts))


def cached_transpose_tile_ids(kv_indices, kv_counts, tile_mask_ids, Tq, Tk, opts):
    """:func:`transpose_tile_ids`, remembered beside the transposed lists of the same live list pair while
    ``tile_mask_ids`` is the same live, unmodified tensor (one tile-id tensor per list pair: a new one replaces it)."""
    if kv_indices.is_cuda and torch.cuda.is_current_stream_capturing():
        return transpose_tile_ids(kv_indices, kv_counts, tile_mask_ids, Tq, Tk, opts)
    key = (Tq, Tk, opts.block_q, opts.block_k, opts.causal, "tile ids")
    known = _TRANSPOSED.peek(kv_indices, kv_counts, key)
    if known is not None and known[0]() is tile_mask_ids and known[1] == tile_mask_ids._version:
        return known[2]
    t_ids = transpose_tile_ids(kv_indices, kv_counts, tile_mask_ids, Tq, Tk, opts)
    _TRANSPOSED.put(kv_indices, kv_counts, key, (weakref.ref(tile_mask_ids), tile_mask_ids._version, t_ids))
    return t_ids


def transpose_tile_ids(kv_indices, kv_counts, tile_mask_ids, Tq, Tk, opts):
    """``tile_mask_ids`` (the shape of ``kv_indices``) in the order of :func:`transpose_lists`' ``q_ids``: entry e of
    the CSR holds the tile id of the list entry that q_ids[e] came from."""
    order, _sorted_rows, _n_rows = _transpose_order(kv_indices, kv_counts, Tq, Tk, opts)
    return tile_mask_ids.flatten()[order].contiguous()


def transpose_lists(kv_indices, kv_counts, Tq, Tk, opts):
    """Per (B', H', key block): the sorted query blocks that read it, as CSR.

    Returns (q_ids int32 [entries], offsets int32 [B' * H' * NK + 1]). Entries that are out of
    range or causally invisible are dropped. No host synchronisation.
    """
    Bp, Hp, n_q, width = kv_indices.shape
    dev = kv_indices.device
    order, sorted_rows, n_rows = _transpose_order(kv_indices, kv_counts, Tq, Tk, opts)
    q_blocks = torch.arange(n_q, device=dev, dtype=torch.int32)[None, None, :, None]
    q_ids = q_blocks.expand(Bp, Hp, n_q, width).flatten()[order].contiguous()
    # Segment starts by binary search (bincount would need a host sync to size its output).
    bounds = torch.arange(n_rows + 1, device=dev, dtype=sorted_rows.dtype)
    offsets = torch.searchsorted(sorted_rows, bounds).to(torch.int32)
    return q_ids, offsets


def _transpose_order(kv_indices, kv_counts, Tq, Tk, opts):
    """The stable sort of every list entry by its (B', H', key block) row: (order, sorted rows, number of rows);
    dropped entries sort past the last row."""
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
    return order, sorted_rows, n_rows


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


def row_dot(out, d_out, poison: bool = False):
    """rowsum(d_out * out) in fp32, [B, Hq, Tq]."""
    B, Hq, Tq, D = out.shape
    delta = _alloc.empty((B, Hq, Tq), torch.float32, out.device, poison)
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
              clean_lo, clean_hi, tile_ids, stride_tile_entry, tile_masks, q_off,
              BQ: tl.constexpr, BK: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
              HAS_TILES: tl.constexpr):
    """dQ over list entries j_lo..j_hi, masking only the entries outside clean_lo..clean_hi and partial tiles (as the
    forward's _attend)."""
    SUB: tl.constexpr = BK // BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    for j in range(j_lo, j_hi):
        blk = tl.load(list_ptr + (j // SUB) * stride_entry)
        cols = blk * BK + (j % SUB) * BLOCK_N + offs_n
        col_ok = cols < Tk
        k = load_tile(k_base + cols[:, None] * stride_kt + offs_d[None, :], col_ok, d_ok,
                      True, EVEN_D)
        v = load_tile(v_base + cols[:, None] * stride_vt + offs_d[None, :], col_ok, d_ok,
                      True, EVEN_D)
        s, t = scores_log2(q, k, cols, bias_ptr, stride_bias_t, Tk, scale_log2, scale_over_cap,
                           cap_log2, HAS_SOFTCAP, HAS_BIAS, True, DOT_PRECISION, False)
        if (j < clean_lo) | (j >= clean_hi):
            s = tl.where(visibility(rows_pos, cols, kv_lo, kv_hi, CAUSAL, False), s, float("-inf"))
        if HAS_TILES:
            s = apply_tile_mask(s, tile_ids, j // SUB, stride_tile_entry, tile_masks, q_off,
                                (j % SUB) * BLOCK_N + offs_n, BQ, BK, False, HAS_TILES)
        p = tl.math.exp2(s - lse2[:, None])
        dp = mma(do, tl.trans(v), None, DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = mma(ds.to(k.dtype), k, dq, DOT_PRECISION)
    return dq


@triton.jit
def _dq_kernel(
        Q, K, V, DO, DQ, Lse, Delta, O, KvIdx, KvCnt, KvStart, KvEnd, Bias, Gain, Active, TileIds, TileMasks,
        scale_log2, scale_over_cap, cap_log2, scale,
        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt, sgqb, sgqh, sgqt, sob, soh, sot,
        sib, sih, siq, sik, scb, sch, scq, sbb, sbh, sbt, sgb, sgt, sgh, sab, sat, sah, stb, sth, stq, stk,
        Hq, Tq, Tk,
        GROUP: tl.constexpr, LIST_DIV: tl.constexpr, BIAS_DIV: tl.constexpr,
        BQ: tl.constexpr, BK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, HAS_GAIN: tl.constexpr, HAS_ACTIVE: tl.constexpr,
        DOT_PRECISION: tl.constexpr, SCAN: tl.constexpr, FUSE_DELTA: tl.constexpr, HAS_TILES: tl.constexpr,
        TILES_FASTEST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh, tile, n_tiles = _program_ids(TILES_FASTEST)
    tile = n_tiles - 1 - tile  # heavy (late, causal) query tiles first
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    b, h, rows, row_ok, rows_pos, offs_d, d_ok, q = query_tile(Q, pid_bh, Hq, tile, sqb, sqh, sqt, Tq, Tk, HEAD_DIM,
                                                               BLOCK_D, BLOCK_M)
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
    tile_ids = TileIds + b * stb + (h // LIST_DIV) * sth + m_blk * stq
    q_off = (tile * BLOCK_M) % BQ + tl.arange(0, BLOCK_M)  # rows' offsets inside their query block
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
    dq = _dq_range(dq, q, do, lse2, delta, k_base, v_base, skt, svt, list_ptr, sik, n_before * SUB,
                   n_vis * SUB, rows_pos, kv_lo, kv_hi, Tk, bias_ptr, sbt, scale_log2, scale_over_cap, cap_log2,
                   offs_d, d_ok, n_lo * SUB, clean_hi * SUB, tile_ids, stk, TileMasks, q_off, BQ, BK, BLOCK_N, EVEN_D,
                   CAUSAL, HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION, HAS_TILES)
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
def _dkdv_range(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dt, q_ids, j_lo, j_hi, cols,
                kv_lo, kv_hi, Tq, Tk, bias_ptr, stride_bias_t, scale_log2, scale_over_cap, cap_log2, offs_d, d_ok,
                BQ: tl.constexpr, BLOCK_M: tl.constexpr, EVEN_D: tl.constexpr,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                masked_below, ONE_LOOP: tl.constexpr, HEADS: tl.constexpr, head_strides,
                tile_ids, tile_masks, k_off, BK: tl.constexpr, HAS_TILES: tl.constexpr):
    """dK/dV over transposed-list entries j_lo..j_hi: all masked (MASKED), none, or (ONE_LOOP) those below
    masked_below.

    With HEADS > 1, j walks (entry, head) pairs, the head fastest, for HEADS consecutive q heads that share the list:
    ``head_strides`` = (q, dO, lse/delta, bias) offsets from one head to the next (the bases are the first head's).
    With HAS_TILES, ``tile_ids`` holds each transposed entry's tile id (aligned with ``q_ids``) and partial tiles AND
    their element mask in, in every loop (a partial tile may sit in the clean stretch)."""
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
        s_t, t_t = scores_log2(k, q, cols, bias_ptr + g * head_strides[3], stride_bias_t, Tk, scale_log2,
                               scale_over_cap, cap_log2, HAS_SOFTCAP, HAS_BIAS, True, DOT_PRECISION, True)
        if ONE_LOOP:
            if j < masked_below:
                s_t = tl.where(visibility(rows + (Tk - Tq), cols, kv_lo, kv_hi, CAUSAL, True), s_t, float("-inf"))
        elif MASKED:
            vis = visibility(rows + (Tk - Tq), cols, kv_lo, kv_hi, CAUSAL, True)
            s_t = tl.where(vis, s_t, float("-inf"))
        if HAS_TILES:
            s_t = apply_tile_mask(s_t, tile_ids, t // SUB, 1, tile_masks, (t % SUB) * BLOCK_M + offs_m, k_off, BQ, BK,
                                  True, HAS_TILES)
        p_t = tl.math.exp2(s_t - lse2[None, :])
        dv = mma(p_t.to(do.dtype), do, dv, DOT_PRECISION)
        dp_t = mma(v, tl.trans(do), None, DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if HAS_SOFTCAP:
            ds_t = ds_t * (1.0 - t_t * t_t)
        dk = mma(ds_t.to(q.dtype), q, dk, DOT_PRECISION)
    return dk, dv


@triton.jit
def _dkdv_kernel(
        Q, K, V, DO, DK, DV, Lse, Delta, QIds, Offsets, KvStart, KvEnd, Bias, TileIdsT, TileMasks,
        scale_log2, scale_over_cap, cap_log2, scale,
        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,
        sdkb, sdkh, sdkt, sdvb, sdvh, sdvt, sbb, sbh, sbt,
        Hkv, Tq, Tk, list_rows_per_batch, n_k_blocks,
        GROUP: tl.constexpr, LIST_DIV: tl.constexpr, BIAS_DIV: tl.constexpr,
        BQ: tl.constexpr, BK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, SCAN: tl.constexpr,
        ONE_LOOP: tl.constexpr, TILES_FASTEST: tl.constexpr, HAS_TILES: tl.constexpr,
        FLAT_GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh, n_tile, _n = _program_ids(TILES_FASTEST)  # early key tiles (read by the most queries, causal) first
    b = (pid_bh // Hkv).to(tl.int64)
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
    k_off = (n_tile * BLOCK_N) % BK + tl.arange(0, BLOCK_N)  # keys' offsets inside their key block

    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
    SUB: tl.constexpr = BQ // BLOCK_M
    # FLAT_GROUP (the group's heads share one list): one walk over (entry, head) pairs instead of one per head.
    HEADS: tl.constexpr = GROUP if FLAT_GROUP else 1
    WALK: tl.constexpr = SUB * HEADS  # steps per list entry
    steps = (sqh, sdh, Tq, sbh if BIAS_DIV == 1 else 0)
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
        bias_ptr = Bias + b * sbb + (h // BIAS_DIV) * sbh
        if ONE_LOOP:  # one pipelined walk, the masked prefix picked by a branch
            dk, dv = _dkdv_range(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqt, sdt, QIds, seg_lo * WALK,
                                 seg_hi * WALK, cols, kv_lo, kv_hi, Tq, Tk, bias_ptr, sbt, scale_log2, scale_over_cap,
                                 cap_log2, offs_d, d_ok, BQ, BLOCK_M, EVEN_D, True, CAUSAL, HAS_BIAS, HAS_SOFTCAP,
                                 DOT_PRECISION, (seg_lo + n_diag) * WALK, True, HEADS, steps, TileIdsT, TileMasks,
                                 k_off, BK, HAS_TILES)
        else:  # two pipelined walks: the masked prefix, then the clean rest (no mask operands live in its loop)
            dk, dv = _dkdv_range(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqt, sdt, QIds, seg_lo * WALK,
                                 (seg_lo + n_diag) * WALK, cols, kv_lo, kv_hi, Tq, Tk, bias_ptr, sbt, scale_log2,
                                 scale_over_cap, cap_log2, offs_d, d_ok, BQ, BLOCK_M, EVEN_D, True, CAUSAL, HAS_BIAS,
                                 HAS_SOFTCAP, DOT_PRECISION, 0, False, HEADS, steps, TileIdsT, TileMasks, k_off, BK,
                                 HAS_TILES)
            dk, dv = _dkdv_range(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqt, sdt, QIds,
                                 (seg_lo + n_diag) * WALK, seg_hi * WALK, cols, kv_lo, kv_hi, Tq, Tk, bias_ptr, sbt,
                                 scale_log2, scale_over_cap, cap_log2, offs_d, d_ok, BQ, BLOCK_M, EVEN_D, False,
                                 CAUSAL, HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION, 0, False, HEADS, steps, TileIdsT,
                                 TileMasks, k_off, BK, HAS_TILES)
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


_TUNE_KEY = ["HEAD_DIM", "BQ", "BK", "CAUSAL", "HAS_PAD", "HAS_BIAS", "GROUP", "HAS_TILES"]
_dq_tuned = triton.autotune(
    configs=_configs([(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 2),
                      (64, 32, 4, 2), (16, 16, 4, 2)]),
    key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune})(_dq_kernel)
_dkdv_tuned = triton.autotune(
    configs=_configs([(64, 128, 8, 3), (32, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 2),
                      (32, 64, 4, 2), (16, 16, 4, 2)]),
    key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune})(_dkdv_kernel)


def backward(d_out, q, k, v, out, lse, kv_indices, kv_counts, opts, kv_start, kv_end, col_bias,
             head_gain, active, tile_masks=None, tile_mask_ids=None):
    """Gradients (dq, dk, dv) of block-sparse attention given the forward's out and lse."""
    q, k, v, out, d_out = (last_dim_contiguous(t) for t in (q, k, v, out, d_out))
    B, Hq, Tq, D = q.shape
    poison = opts.kernel.poison_outputs
    # delta = rowsum(dO * O) with the caller's dO: = rowsum(dO_attn * O_attn) even with a gain (see module doc), so the
    # dQ pass can form it only while its dO is the caller's (no gain folded in).
    delta_in_dq = head_gain is None
    if delta_in_dq:
        delta = _alloc.empty((B, Hq, Tq), torch.float32, q.device, poison)
    else:
        delta = row_dot(out, d_out, poison)
    if head_gain is not None:
        from .reference import _gain_as_bhtd
        d_out = d_out * _gain_as_bhtd(head_gain).to(d_out.dtype)
    d_out = last_dim_contiguous(d_out)
    kv_start, kv_end = pad_bounds(q, k, kv_start, kv_end)
    hooks = hook_args(q, k, kv_indices, col_bias, None, active, kv_start, kv_end)
    scales = (*softmax_scales(opts), opts.scale)
    plan = backward_plan(D, hooks["consts"]["GROUP"], hooks["consts"]["LIST_DIV"])
    tile_hooks = tile_args(kv_indices, tile_masks, tile_mask_ids, opts.kernel.tile_mask_branch)
    consts = dict(hooks["consts"], **tile_hooks["consts"], BQ=opts.block_q, BK=opts.block_k, HEAD_DIM=D,
                  BLOCK_D=max(16, triton.next_power_of_2(D)), CAUSAL=opts.causal,
                  HAS_SOFTCAP=opts.softcap is not None, DOT_PRECISION=dot_precision(q.dtype),
                  SCAN=64, TILES_FASTEST=plan.tiles_fastest)
    tiles = dict(zip(("BLOCK_M", "BLOCK_N"), interpreter_tiles(opts.block_q, opts.block_k, opts.kernel)))
    # dQ in the (B, Tq, Hq, D) layout the attention output uses.
    dq = _alloc.empty((B, Tq, Hq, D), q.dtype, q.device, poison).transpose(1, 2)
    _dq_pass(q, k, v, d_out, dq, lse, delta, out, kv_indices, kv_counts, hooks, tile_hooks, scales,
             dict(consts, FUSE_DELTA=delta_in_dq), tiles, opts.kernel.autotune)
    dk, dv = _dkdv_pass(q, k, v, d_out, lse, delta, kv_indices, kv_counts, col_bias, opts, hooks,
                        scales, consts, tiles, plan, tile_masks, tile_mask_ids)
    return dq, dk, dv


def _dq_pass(q, k, v, d_out, dq, lse, delta, out, kv_indices, kv_counts, hooks, tile_hooks, scales, consts, tiles,
             autotune):
    B, Hq, Tq, _ = q.shape
    args = (q, k, v, d_out, dq, lse, delta, out, kv_indices, kv_counts, *hooks["ptrs"], *tile_hooks["ptrs"], *scales,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *d_out.stride()[:3],
            *dq.stride()[:3], *out.stride()[:3], *list_strides(kv_indices), *list_strides(kv_counts),
            *hooks["strides"], *tile_hooks["strides"], Hq, Tq, k.shape[2])
    launch(_dq_tuned, lambda meta: _grid(B * Hq, triton.cdiv(Tq, meta["BLOCK_M"]), consts), args, consts, tiles,
           q.device, autotune)


def _grid(head_programs, tile_programs, consts):
    return (tile_programs, head_programs) if consts["TILES_FASTEST"] else (head_programs, tile_programs)


def _dkdv_pass(q, k, v, d_out, lse, delta, kv_indices, kv_counts, col_bias, opts, hooks, scales, consts, tiles,
               plan, tile_masks=None, tile_mask_ids=None):
    B, Hkv, Tk, _ = k.shape
    Tq = q.shape[2]
    q_ids, offsets = cached_transpose_lists(kv_indices, kv_counts, Tq, Tk, opts)
    if tile_masks is not None:
        tile_ptrs = (cached_transpose_tile_ids(kv_indices, kv_counts, tile_mask_ids, Tq, Tk, opts),
                     tile_masks.view(torch.uint8))
    else:
        tile_ptrs = (q_ids, q_ids)  # never dereferenced
    dk = _alloc.empty(k.shape, k.dtype, k.device, opts.kernel.poison_outputs)
    dv = _alloc.empty(v.shape, v.dtype, v.device, opts.kernel.poison_outputs)
    n_k_blocks = math.ceil(Tk / opts.block_k)
    rows_per_batch = 0 if kv_indices.shape[0] == 1 else kv_indices.shape[1] * n_k_blocks
    bias_s = list_strides(col_bias) if col_bias is not None else (0, 0, 0)
    kv_start_p, kv_end_p, bias_p, _gain_p, _act_p = hooks["ptrs"]
    kv_consts = {key: val for key, val in consts.items() if key not in ("HAS_GAIN", "HAS_ACTIVE")}
    kv_consts.update(ONE_LOOP=not plan.two_loop_dkdv, FLAT_GROUP=plan.flat_group)
    args = (q, k, v, d_out, dk, dv, lse, delta, q_ids, offsets, kv_start_p, kv_end_p, bias_p, *tile_ptrs,
            *scales, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *d_out.stride()[:3],
            *dk.stride()[:3], *dv.stride()[:3], *bias_s, Hkv, Tq, Tk, rows_per_batch, n_k_blocks)
    launch(_dkdv_tuned, lambda meta: _grid(B * Hkv, triton.cdiv(Tk, meta["BLOCK_N"]), consts), args, kv_consts,
           tiles, q.device, opts.kernel.autotune)
    return dk, dv
