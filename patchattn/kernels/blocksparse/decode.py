"""Split-K block-sparse decoding (flash-decoding): a few new queries against a long KV cache.

Decoding is bound by reading K/V, and one sequence has too few (head, query) rows to fill the GPU,
so the *list of selected key blocks* is cut into ``n_splits`` contiguous stretches, each read by
its own program, and the partial softmaxes (max, sum, weighted values) are merged.  The merge is
fused into the same launch (FlashDecoding's "last program merges"): each program writes its partial,
bumps a per-(batch, head group) counter, and the program that brings it to ``n_splits`` merges the
group's partials and resets the counter to 0 for the next call (or CUDA-graph replay).  At batch 1
the call is latency-bound, so one launch instead of two is what counts.  With ``n_splits == 1`` the
program writes the output directly.  ``PATCHATTN_DECODE_MERGE=separate`` keeps the former second
merge kernel (for A/B timing).
When the whole GQA group reads the same blocks, one program serves all its q heads, so each
selected K/V block is read from memory once per kv head, not once per q head.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from . import _alloc
from .triton_fwd import (
    dot_precision,
    hook_args,
    last_dim_contiguous,
    launch,
    list_strides,
    load_tile,
    mma,
    pad_bounds,
    reduce_max,
    reduce_sum,
    scores_log2,
    softmax_scales,
    visibility,
)

# Aim for this many programs per multiprocessor when choosing the number of splits.  H200, 128k keys, 5% of the
# blocks (bench/decode/): 1 per SM beat 2, 4 and 8 at batch 1 (graphed 4.9x SDPA vs 4.4x / 3.2x / 3.3x): more
# splits mean more partial results for the merge to read and combine.
PROGRAMS_PER_SM = int(os.environ.get("PATCHATTN_DECODE_PROGRAMS_PER_SM", "1"))
_SM_COUNT: dict = {}
# "fused": one launch, the last split program of a row group merges; "separate": a second merge kernel.
MERGE = os.environ.get("PATCHATTN_DECODE_MERGE", "fused")
if MERGE not in ("fused", "separate"):
    raise ValueError(f"PATCHATTN_DECODE_MERGE={MERGE!r}: expected 'fused' or 'separate'")
# The merge reads the partials' row maxima this many splits at a time (a fixed width, so the split
# kernel is not recompiled and re-tuned for every power of two of n_splits).
MERGE_TILE = 16


@triton.jit
def _store_partial(PartAcc, PartM, PartL, part, r, offs_d, acc, m_i, l_i,
                   ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """One split's unnormalised result for its rows: acc = sum 2^(s - m) v, the max m, the sum l."""
    tl.store(PartAcc + (part * ROWS + r[:, None]) * BLOCK_D + offs_d[None, :], acc)
    tl.store(PartM + part * ROWS + r, m_i)
    tl.store(PartL + part * ROWS + r, l_i)


@triton.jit
def _merge_partials(PartAcc, PartM, PartL, first, n_splits, r, offs_d,
                    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, MERGE_TILE: tl.constexpr):
    """(acc, l, m) of a row group as one program would have found them: its n_splits partials,
    rescaled to their common max (0 where no split saw a key) and summed.

    Loads go through L2 only (.cg): in the fused kernel the partials were written by other programs
    of the same launch, and an L1 line must not be reused."""
    m_max = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    for s0 in range(0, n_splits, MERGE_TILE):
        sp = s0 + tl.arange(0, MERGE_TILE)
        m_all = tl.load(PartM + (first + sp[:, None]) * ROWS + r[None, :],
                        mask=sp[:, None] < n_splits, other=float("-inf"), cache_modifier=".cg")
        m_max = tl.maximum(m_max, reduce_max(m_all, 0))
    m_use = tl.where(m_max == float("-inf"), 0.0, m_max)
    acc = tl.full([ROWS, BLOCK_D], 0.0, dtype=tl.float32)
    l_sum = tl.full([ROWS], 0.0, dtype=tl.float32)
    for s in range(0, n_splits):
        w = tl.math.exp2(tl.load(PartM + (first + s) * ROWS + r, cache_modifier=".cg") - m_use)
        l_sum += w * tl.load(PartL + (first + s) * ROWS + r, cache_modifier=".cg")
        acc += w[:, None] * tl.load(PartAcc + ((first + s) * ROWS + r[:, None]) * BLOCK_D
                                    + offs_d[None, :], cache_modifier=".cg")
    return acc, l_sum, m_use


@triton.jit
def _write_rows(acc, l_sum, m_use, Out, Lse, Gain, Active, b, head, t, row_ok, offs_d,
                sob, soh, sot, sgb, sgt, sgh, sab, sat, sah, Hq, Tq,
                HEAD_DIM: tl.constexpr, HAS_GAIN: tl.constexpr, HAS_ACTIVE: tl.constexpr,
                WRITE_LSE: tl.constexpr):
    """Normalise merged rows, apply head_gain / active, store out (input dtype) and lse (natural
    log; -inf and a zero output for a row that saw no key)."""
    seen = l_sum > 0.0
    out = acc / tl.where(seen, l_sum, 1.0)[:, None]
    if HAS_GAIN:
        gain = tl.load(Gain + b * sgb + t * sgt + head * sgh, mask=row_ok, other=0.0)
        out = out * gain.to(tl.float32)[:, None]
    lse = tl.where(seen, (m_use + tl.math.log2(tl.where(seen, l_sum, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    if HAS_ACTIVE:
        act = tl.load(Active + b * sab + t * sat + head * sah, mask=row_ok, other=0) != 0
        out = tl.where(act[:, None], out, 0.0)
        lse = tl.where(act, lse, float("-inf"))
    o_ptrs = Out + b * sob + head[:, None] * soh + t[:, None] * sot + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    if WRITE_LSE:
        tl.store(Lse + (b * Hq + head) * Tq + t, lse, mask=row_ok)


@triton.jit
def _decode_split_kernel(
        Q, K, V, PartAcc, PartM, PartL, KvIdx, KvCnt, KvStart, KvEnd, Bias, Gain, Active,
        Out, Lse, Counter,
        scale_log2, scale_over_cap, cap_log2,
        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
        sib, sih, siq, sik, scb, sch, scq, sbb, sbh, sbt, sgb, sgt, sgh, sab, sat, sah,
        sob, soh, sot,
        Hq, Tq, Tk, entries_per_split,
        GROUP: tl.constexpr, LIST_DIV: tl.constexpr, BIAS_DIV: tl.constexpr, HEADS: tl.constexpr,
        ROWS: tl.constexpr, BK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, HAS_GAIN: tl.constexpr, HAS_ACTIVE: tl.constexpr,
        DOT_PRECISION: tl.constexpr, FUSED: tl.constexpr, WRITE_LSE: tl.constexpr,
        MERGE_TILE: tl.constexpr, BLOCK_N: tl.constexpr):
    split = tl.program_id(0)
    n_splits = tl.num_programs(0)
    pid_bg = tl.program_id(1)  # (batch, head group)
    n_groups = Hq // HEADS
    b = (pid_bg // n_groups).to(tl.int64)
    h0 = (pid_bg % n_groups) * HEADS
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    r = tl.arange(0, ROWS)  # row = (head in group, query)
    head = h0 + r // Tq
    t = r % Tq
    row_ok = r < HEADS * Tq
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = load_tile(Q + b * sqb + head[:, None] * sqh + t[:, None] * sqt + offs_d[None, :], row_ok,
                  d_ok, True, EVEN_D)
    k_base = K + b * skb + (h0 // GROUP) * skh
    v_base = V + b * svb + (h0 // GROUP) * svh
    bias_ptr = Bias + b * sbb + (h0 // BIAS_DIV) * sbh
    rows_pos = t + (Tk - Tq)
    kv_lo = 0
    kv_hi = Tk
    if HAS_PAD:
        kv_lo = tl.load(KvStart + b)
        kv_hi = tl.minimum(tl.load(KvEnd + b), Tk)
    list_ptr = KvIdx + b * sib + (h0 // LIST_DIV) * sih
    count = tl.load(KvCnt + b * scb + (h0 // LIST_DIV) * sch)
    if HAS_ACTIVE:
        act = tl.load(Active + b * sab + t * sat + head * sah, mask=row_ok, other=0) != 0
        count = tl.where(reduce_max(act.to(tl.int32), 0) > 0, count, 0)
    e_lo = split * entries_per_split
    e_hi = tl.minimum(e_lo + entries_per_split, count)

    SUB: tl.constexpr = BK // BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    acc = tl.full([ROWS, BLOCK_D], 0.0, dtype=tl.float32)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.full([ROWS], 0.0, dtype=tl.float32)
    for j in range(e_lo * SUB, e_hi * SUB):
        blk = tl.load(list_ptr + (j // SUB) * sik)
        cols = blk * BK + (j % SUB) * BLOCK_N + offs_n
        col_ok = cols < Tk
        k = load_tile(k_base + cols[:, None] * skt + offs_d[None, :], col_ok, d_ok, True, EVEN_D)
        v = load_tile(v_base + cols[:, None] * svt + offs_d[None, :], col_ok, d_ok, True, EVEN_D)
        s, _t = scores_log2(q, k, cols, bias_ptr, sbt, Tk, scale_log2, scale_over_cap, cap_log2,
                            HAS_SOFTCAP, HAS_BIAS, True, DOT_PRECISION, False)
        s = tl.where(visibility(rows_pos, cols, kv_lo, kv_hi, CAUSAL, False), s, float("-inf"))
        m_new = tl.maximum(m_i, reduce_max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + reduce_sum(p, 1)
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION)
        m_i = m_new

    first = pid_bg.to(tl.int64) * n_splits
    if not FUSED:  # the merge kernel runs next
        _store_partial(PartAcc, PartM, PartL, first + split, r, offs_d, acc, m_i, l_i, ROWS, BLOCK_D)
    elif n_splits == 1:  # nothing to merge
        _write_rows(acc, l_i, tl.where(m_i == float("-inf"), 0.0, m_i), Out, Lse, Gain, Active,
                    b, head, t, row_ok, offs_d, sob, soh, sot, sgb, sgt, sgh, sab, sat, sah, Hq, Tq,
                    HEAD_DIM, HAS_GAIN, HAS_ACTIVE, WRITE_LSE)
    else:
        _store_partial(PartAcc, PartM, PartL, first + split, r, offs_d, acc, m_i, l_i, ROWS, BLOCK_D)
        # Every thread's stores precede (barrier) the counter's release by the one thread doing the
        # atomic; its acquire side makes all the group's partials visible to the last program.
        tl.debug_barrier()
        arrived = tl.atomic_add(Counter + pid_bg, 1, sem="acq_rel", scope="gpu")
        if arrived == n_splits - 1:
            tl.debug_barrier()  # the acquire (one thread) precedes every thread's partial loads
            g_acc, g_l, g_m = _merge_partials(PartAcc, PartM, PartL, first, n_splits, r, offs_d,
                                              ROWS, BLOCK_D, MERGE_TILE)
            _write_rows(g_acc, g_l, g_m, Out, Lse, Gain, Active, b, head, t, row_ok, offs_d,
                        sob, soh, sot, sgb, sgt, sgh, sab, sat, sah, Hq, Tq,
                        HEAD_DIM, HAS_GAIN, HAS_ACTIVE, WRITE_LSE)
            # Every program of the group has arrived: reset for the next launch or graph replay.
            tl.store(Counter + pid_bg, 0)


@triton.jit
def _decode_combine_kernel(
        PartAcc, PartM, PartL, Out, Lse, Gain, Active,
        sob, soh, sot, sgb, sgt, sgh, sab, sat, sah,
        Hq, Tq, n_splits,
        HEADS: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        MERGE_TILE: tl.constexpr, HAS_GAIN: tl.constexpr, HAS_ACTIVE: tl.constexpr,
        WRITE_LSE: tl.constexpr):
    """The separate merge (PATCHATTN_DECODE_MERGE=separate): one program per (batch, head group)."""
    pid_bg = tl.program_id(0)
    n_groups = Hq // HEADS
    b = (pid_bg // n_groups).to(tl.int64)
    h0 = (pid_bg % n_groups) * HEADS
    r = tl.arange(0, ROWS)
    head = h0 + r // Tq
    t = r % Tq
    row_ok = r < HEADS * Tq
    offs_d = tl.arange(0, BLOCK_D)
    acc, l_sum, m_use = _merge_partials(PartAcc, PartM, PartL, pid_bg.to(tl.int64) * n_splits,
                                        n_splits, r, offs_d, ROWS, BLOCK_D, MERGE_TILE)
    _write_rows(acc, l_sum, m_use, Out, Lse, Gain, Active, b, head, t, row_ok, offs_d,
                sob, soh, sot, sgb, sgt, sgh, sab, sat, sah, Hq, Tq,
                HEAD_DIM, HAS_GAIN, HAS_ACTIVE, WRITE_LSE)


_decode_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
             for n, w, s in [(64, 4, 3), (128, 4, 3), (128, 8, 3), (64, 4, 4)]],
    key=["HEAD_DIM", "BK", "ROWS", "HAS_PAD", "HAS_BIAS", "FUSED"],
    prune_configs_by={"early_config_prune": lambda cfgs, named, **kw: [
        c for c in cfgs if c.kwargs["BLOCK_N"] <= kw["BK"]
        and (kw["BLOCK_D"] <= 128 or c.kwargs["BLOCK_N"] <= 64)] or cfgs[:1]})(_decode_split_kernel)


def _sm_count(device):
    if device.type != "cuda":
        return 4
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device]


def heads_per_program(q, k, kv_indices, col_bias):
    """The whole GQA group shares a program when it reads the same blocks with the same bias."""
    Hkv = k.shape[1]
    shared = kv_indices.shape[1] in (1, Hkv) and (col_bias is None or col_bias.shape[1] in (1, Hkv))
    return q.shape[1] // Hkv if shared else 1


def choose_splits(n_programs_base, n_entries, device):
    """Enough splits to give every SM a couple of programs, never an empty one by construction."""
    want = max(1, math.ceil(PROGRAMS_PER_SM * _sm_count(device) / n_programs_base))
    n_splits = max(1, min(want, n_entries))
    per_split = math.ceil(n_entries / n_splits)
    return math.ceil(n_entries / per_split), per_split


def _partials(n_row_groups, n_splits, rows, block_d, device, spare, fused):
    """(acc, m, l) buffers of every split; a single fused split writes the output directly and
    gets ``spare`` (never dereferenced) instead."""
    if fused and n_splits == 1:
        return spare, spare, spare
    return (_alloc.empty((n_row_groups, n_splits, rows, block_d), torch.float32, device),
            _alloc.empty((n_row_groups, n_splits, rows), torch.float32, device),
            _alloc.empty((n_row_groups, n_splits, rows), torch.float32, device))


def _merge_separately(parts, out, lse, hooks, consts, Hq, Tq, n_splits, n_row_groups):
    """The second launch of PATCHATTN_DECODE_MERGE=separate."""
    _gain_p, act_p = hooks["ptrs"][3:]
    combine_consts = {key: consts[key] for key in
                      ("HEADS", "ROWS", "HEAD_DIM", "BLOCK_D", "HAS_GAIN", "HAS_ACTIVE")}
    _decode_combine_kernel[(n_row_groups,)](
        *parts, out, lse, _gain_p, act_p, *out.stride()[:3], *hooks["strides"][3:], Hq, Tq,
        n_splits, **combine_consts, MERGE_TILE=MERGE_TILE, WRITE_LSE=consts["WRITE_LSE"])


def decode_attention(q, k, v, kv_indices, kv_counts, opts, kv_start, kv_end, col_bias, head_gain,
                     active, need_lse=True):
    """Same contract as the forward kernel for Tq <= block_q (one query block)."""
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    kv_start, kv_end = pad_bounds(q, k, kv_start, kv_end)
    heads = heads_per_program(q, k, kv_indices, col_bias)
    rows = max(16, triton.next_power_of_2(heads * Tq))
    block_d = max(16, triton.next_power_of_2(D))
    n_groups = Hq // heads
    n_splits, per_split = choose_splits(B * n_groups, kv_indices.shape[-1], q.device)
    fused = MERGE == "fused"

    counters = _alloc.counters(B * n_groups, q.device, "decode_merge")
    spare = counters.view(torch.float32)  # an fp32 pointer for buffers a launch never touches
    parts = _partials(B * n_groups, n_splits, rows, block_d, q.device, spare, fused)
    out = _alloc.empty((B, Tq, Hq, D), q.dtype, q.device).transpose(1, 2)
    lse = _alloc.empty((B, Hq, Tq), torch.float32, q.device) if need_lse else None
    hooks = hook_args(q, k, kv_indices, col_bias, head_gain, active, kv_start, kv_end)
    consts = dict(hooks["consts"], HEADS=heads, ROWS=rows, HEAD_DIM=D, BLOCK_D=block_d,
                  WRITE_LSE=need_lse)
    split_args = (q, k, v, *parts, kv_indices, kv_counts, *hooks["ptrs"],
                  out, lse if need_lse else spare, counters,
                  *softmax_scales(opts), *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                  *list_strides(kv_indices), *list_strides(kv_counts), *hooks["strides"],
                  *out.stride()[:3], Hq, Tq, Tk, per_split)
    # WRITE_LSE only matters to the fused kernel; pinned otherwise so need_lse makes no second variant.
    split_consts = dict(consts, BK=opts.block_k, CAUSAL=opts.causal,
                        HAS_SOFTCAP=opts.softcap is not None, DOT_PRECISION=dot_precision(q.dtype),
                        FUSED=fused, WRITE_LSE=need_lse and fused, MERGE_TILE=MERGE_TILE)
    launch(_decode_tuned, lambda meta: (n_splits, B * n_groups), split_args, split_consts,
           dict(BLOCK_N=min(opts.block_k, 64)), q.device)
    if not fused:
        _merge_separately(parts, out, lse if need_lse else spare, hooks, consts, Hq, Tq, n_splits,
                          B * n_groups)
    return out, lse
