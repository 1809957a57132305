"""Split-K block-sparse decoding (flash-decoding): a few new queries against a long KV cache.

Decoding is bound by reading K/V, and one sequence has too few (head, query) rows to fill the GPU,
so the *list of selected key blocks* is cut into ``n_splits`` contiguous stretches, each read by
its own program, and the partial softmaxes (max, sum, weighted values) are merged.  The merge is
fused into the same launch (FlashDecoding's "last program merges"): each program writes its partial,
bumps a per-(batch, head group) counter, and the program that brings it to ``n_splits`` merges the
group's partials and resets the counter to 0 for the next call (or CUDA-graph replay).  At batch 1
the call is latency-bound, so one launch instead of two is what counts, and the merge is the tail of the
whole call (the other programs are done): it loads every row's partials of a group in one round where
they fit (``merge_walk``).  With ``n_splits == 1`` the
program writes the output directly.  (A separate merge kernel was measured and removed: 26.4 vs 26.2 us graphed, 0.37
vs 0.099 ms eager at batch 1, bench/decode/RESULTS.md.)
When the whole GQA group reads the same blocks, one program serves all its q heads, so each
selected K/V block is read from memory once per kv head, not once per q head.
"""
from __future__ import annotations

import math

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
    pdl_options,
    reduce_max,
    reduce_sum,
    scores_log2,
    softmax_scales,
    visibility,
    wait_for_previous_kernel,
)

# Programs per multiprocessor when choosing the number of splits (H200, 128k keys, bench/decode/RESULTS.md): a
# program serving a whole GQA group (shared lists) is best at 1 per SM (batch 1 graphed: 5.85x SDPA vs 5.75x with
# 2; before the row-wise merge 4.9x vs 4.4x / 3.2x / 3.3x with 2 / 4 / 8); one serving a single q head (per-head
# lists) at 2 while there are fewer row groups than SMs (blocktopk step, batch 1, 8 layers per graph: 4.1-4.3x vs
# 4.0x), 1 otherwise (batch 8: 256 row groups, 9.5x vs 8.6x).  KernelOptions.decode_programs_per_sm overrides it.
_SM_COUNT: dict = {}
# Longest stretch of a list one program walks. Row groups with very different counts (duo: full heads beside
# streaming heads, lists as wide as the cache) would otherwise leave a few programs walking a whole cache each while
# the rest finish at once (H200, duo at batch 8, 128k: 0.36x SDPA with one split per row group). The lists of the
# top-k methods and the kernel benchmark (width <= 64) are not affected.
ENTRIES_PER_PROGRAM = 64
# The merge reads the partials' row maxima this many splits at a time (a fixed width, so the split
# kernel is not recompiled and re-tuned for every power of two of n_splits).
MERGE_TILE = 16
# How the merging program walks the partials: "together" loads every row and TOGETHER_ELEMENTS worth of splits at
# once (GQA-shared lists at batch 1 run 4 rows x ~17 splits: one L2 round trip), "rows" loads ROW_MERGE_TILE splits
# of one row at once (a round trip per row and tile), "splits" loads one split of every row at a time (a round
# trip per split: many rows, e.g. a speculative block of queries); ``merge_walk`` takes the fewest round trips.
ROW_MERGE_TILE = 32
# "together": every row of the group and as many splits as fit in this many fp32 elements ([rows, splits,
# head_dim]) per load round, so a GQA group's 4 rows cost one round instead of four.  H200, 128k keys, 5% of
# the blocks in GQA-shared lists, batch 1 (4 rows x 17 splits), graphed, 1 / 8 layers per graph: rows 23.2 / 18.8
# us, together with 8192 elements (2 rounds) 20.8 / 15.9, with 16384 (1 round) 19.8 / 15.1 (bench/decode/
# merge_walks/).  The merging program's registers cost nothing at one program per SM.
TOGETHER_ELEMENTS = 16384


@triton.jit
def _store_partial(PartAcc, PartM, PartL, part, r, row_ok, offs_d, acc, m_i, l_i,
                   ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """One split's unnormalised result for its real rows: acc = sum 2^(s - m) v, the max m, the sum l."""
    tl.store(PartAcc + (part * ROWS + r[:, None]) * BLOCK_D + offs_d[None, :], acc, mask=row_ok[:, None])
    tl.store(PartM + part * ROWS + r, m_i, mask=row_ok)
    tl.store(PartL + part * ROWS + r, l_i, mask=row_ok)


@triton.jit
def _merge_rows(PartAcc, PartM, PartL, first, n_splits, row0, n_rows, offs_d,
                ROWS: tl.constexpr, BLOCK_D: tl.constexpr, NR: tl.constexpr, S_TILE: tl.constexpr):
    """(acc [NR, BLOCK_D], l [NR], m [NR]) of a group's rows row0 .. row0 + NR over its n_splits partials, S_TILE
    splits of every row per round, all of a round's loads issued together (an online softmax over rounds; rows from
    n_rows on, whose partials were never written, are masked out).  Loads through L2 only, as _merge_partials."""
    row = row0 + tl.arange(0, NR)
    row_ok = row < n_rows
    m_run = tl.full([NR], float("-inf"), dtype=tl.float32)
    l_run = tl.full([NR], 0.0, dtype=tl.float32)
    acc_run = tl.full([NR, BLOCK_D], 0.0, dtype=tl.float32)
    for s0 in range(0, n_splits, S_TILE):
        sp = s0 + tl.arange(0, S_TILE)
        ok = row_ok[:, None] & (sp < n_splits)[None, :]
        at = (first + sp)[None, :] * ROWS + row[:, None]  # [NR, S_TILE]
        m = tl.load(PartM + at, mask=ok, other=float("-inf"), cache_modifier=".cg")
        part_l = tl.load(PartL + at, mask=ok, other=0.0, cache_modifier=".cg")
        part_acc = tl.load(PartAcc + at[:, :, None] * BLOCK_D + offs_d[None, None, :], mask=ok[:, :, None],
                           other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m_run, reduce_max(m, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.math.exp2(m - m_use[:, None])  # 0 for a split that saw no key (m = -inf)
        alpha = tl.math.exp2(m_run - m_use)
        l_run = l_run * alpha + reduce_sum(w * part_l, 1)
        acc_run = acc_run * alpha[:, None] + reduce_sum(w[:, :, None] * part_acc, 1)
        m_run = m_new
    return acc_run, l_run, tl.where(m_run == float("-inf"), 0.0, m_run)


@triton.jit
def _merge_and_write_row(PartAcc, PartM, PartL, first, n_splits, row0, h0, offs_d, Out, Lse, Gain, Active, b,
                         sob, soh, sot, sgb, sgt, sgh, sab, sat, sah, Hq, Tq,
                         ROWS: tl.constexpr, BLOCK_D: tl.constexpr, ROW_TILE: tl.constexpr,
                         HEAD_DIM: tl.constexpr, HAS_GAIN: tl.constexpr, HAS_ACTIVE: tl.constexpr,
                         WRITE_LSE: tl.constexpr):
    """Merge one row (head-group-relative) of a row group over its splits, ROW_TILE per round, and write it out."""
    acc, l_sum, m_use = _merge_rows(PartAcc, PartM, PartL, first, n_splits, row0, row0 + 1, offs_d, ROWS, BLOCK_D,
                                    1, ROW_TILE)
    row = row0 + tl.arange(0, 1)
    _write_rows(acc, l_sum, m_use, Out, Lse, Gain, Active, b, h0 + row // Tq, row % Tq, row >= 0, offs_d,
                sob, soh, sot, sgb, sgt, sgh, sab, sat, sah, Hq, Tq, HEAD_DIM, HAS_GAIN, HAS_ACTIVE, WRITE_LSE)


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
        Hq, Tq, Tk,
        GROUP: tl.constexpr, LIST_DIV: tl.constexpr, BIAS_DIV: tl.constexpr, HEADS: tl.constexpr,
        ROWS: tl.constexpr, BK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, HAS_GAIN: tl.constexpr, HAS_ACTIVE: tl.constexpr,
        DOT_PRECISION: tl.constexpr, WRITE_LSE: tl.constexpr, FROM_START: tl.constexpr,
        MERGE_TILE: tl.constexpr, MERGE_ROWS: tl.constexpr, ROW_TILE: tl.constexpr,
        MERGE_TOGETHER: tl.constexpr, NR: tl.constexpr, S_TILE: tl.constexpr, PDL: tl.constexpr,
        BLOCK_N: tl.constexpr):
    wait_for_previous_kernel(PDL)  # the lists may come from the kernel just before (a method's block choice)
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
    col_limit = Tk
    if FROM_START:  # block ids count from the row's first real key, whose last keys are the queries
        k_base += kv_lo.to(tl.int64) * skt
        v_base += kv_lo.to(tl.int64) * svt
        kv_hi = kv_hi - kv_lo
        kv_lo = 0
        col_limit = kv_hi
        rows_pos = t + (kv_hi - Tq)
    list_ptr = KvIdx + b * sib + (h0 // LIST_DIV) * sih
    count = tl.load(KvCnt + b * scb + (h0 // LIST_DIV) * sch)
    if HAS_ACTIVE:
        act = tl.load(Active + b * sab + t * sat + head * sah, mask=row_ok, other=0) != 0
        count = tl.where(reduce_max(act.to(tl.int32), 0) > 0, count, 0)
    # The list's real length (count), not its padded width, is shared out: lists sized by a loose bound would
    # otherwise leave the work to the first splits.
    per_split = (count + n_splits - 1) // n_splits
    e_lo = split * per_split
    e_hi = tl.minimum(e_lo + per_split, count)

    SUB: tl.constexpr = BK // BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    acc = tl.full([ROWS, BLOCK_D], 0.0, dtype=tl.float32)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.full([ROWS], 0.0, dtype=tl.float32)
    for j in range(e_lo * SUB, e_hi * SUB):
        blk = tl.load(list_ptr + (j // SUB) * sik)
        cols = blk * BK + (j % SUB) * BLOCK_N + offs_n
        col_ok = cols < col_limit
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
    if n_splits == 1:  # nothing to merge
        _write_rows(acc, l_i, tl.where(m_i == float("-inf"), 0.0, m_i), Out, Lse, Gain, Active,
                    b, head, t, row_ok, offs_d, sob, soh, sot, sgb, sgt, sgh, sab, sat, sah, Hq, Tq,
                    HEAD_DIM, HAS_GAIN, HAS_ACTIVE, WRITE_LSE)
    else:
        _store_partial(PartAcc, PartM, PartL, first + split, r, row_ok, offs_d, acc, m_i, l_i, ROWS, BLOCK_D)
        # Every thread's stores precede (barrier) the counter's release by the one thread doing the
        # atomic; its acquire side makes all the group's partials visible to the last program.
        tl.debug_barrier()
        arrived = tl.atomic_add(Counter + pid_bg, 1, sem="acq_rel", scope="gpu")
        if arrived == n_splits - 1:
            tl.debug_barrier()  # the acquire (one thread) precedes every thread's partial loads
            if MERGE_TOGETHER:
                g_acc, g_l, g_m = _merge_rows(PartAcc, PartM, PartL, first, n_splits, 0, HEADS * Tq, offs_d,
                                              ROWS, BLOCK_D, NR, S_TILE)
                rr = tl.arange(0, NR)
                _write_rows(g_acc, g_l, g_m, Out, Lse, Gain, Active, b, h0 + rr // Tq, rr % Tq, rr < HEADS * Tq,
                            offs_d, sob, soh, sot, sgb, sgt, sgh, sab, sat, sah, Hq, Tq,
                            HEAD_DIM, HAS_GAIN, HAS_ACTIVE, WRITE_LSE)
            elif MERGE_ROWS:
                for rr in range(0, HEADS * Tq):
                    _merge_and_write_row(PartAcc, PartM, PartL, first, n_splits, rr, h0,
                                         offs_d, Out, Lse, Gain, Active, b, sob, soh, sot, sgb, sgt, sgh, sab,
                                         sat, sah, Hq, Tq, ROWS, BLOCK_D, ROW_TILE, HEAD_DIM, HAS_GAIN,
                                         HAS_ACTIVE, WRITE_LSE)
            else:
                g_acc, g_l, g_m = _merge_partials(PartAcc, PartM, PartL, first, n_splits, r, offs_d,
                                                  ROWS, BLOCK_D, MERGE_TILE)
                _write_rows(g_acc, g_l, g_m, Out, Lse, Gain, Active, b, head, t, row_ok, offs_d,
                            sob, soh, sot, sgb, sgt, sgh, sab, sat, sah, Hq, Tq,
                            HEAD_DIM, HAS_GAIN, HAS_ACTIVE, WRITE_LSE)
            # Every program of the group has arrived: reset for the next launch or graph replay.
            tl.store(Counter + pid_bg, 0)


def prune_decode_configs(configs, named_args, **kwargs):
    """Sub-tiles that divide the key blocks (a BLOCK_N above BK would walk no sub-tile at all) and fit head_dim 256;
    the 16- and 32-key sub-tiles are there for blocks of 16 and 32."""
    return [c for c in configs if c.kwargs["BLOCK_N"] <= kwargs["BK"]
            and (kwargs["BLOCK_D"] <= 128 or c.kwargs["BLOCK_N"] <= 64)]


_decode_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
             for n, w, s in [(64, 4, 3), (128, 4, 3), (128, 8, 3), (64, 4, 4), (32, 4, 3), (16, 4, 3)]],
    key=["HEAD_DIM", "BK", "ROWS", "HAS_PAD", "HAS_BIAS"],
    prune_configs_by={"early_config_prune": prune_decode_configs})(_decode_split_kernel)


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


def choose_splits(n_programs_base, n_entries, device, heads=1, programs_per_sm: int | None = None):
    """``programs_per_sm`` programs per SM (None: the measured rule above), and enough splits that no program walks
    more than ENTRIES_PER_PROGRAM entries of a list as wide as the lists, at most one per list entry (the lists'
    width; each program's share of a list's real count is worked out in the kernel)."""
    sms = _sm_count(device)
    per_sm = programs_per_sm if programs_per_sm is not None else (2 if heads == 1 and n_programs_base < sms else 1)
    want = max(math.ceil(per_sm * sms / n_programs_base), math.ceil(n_entries / ENTRIES_PER_PROGRAM))
    return max(1, min(want, n_entries))


def _partials(n_row_groups, n_splits, rows, block_d, device, spare, poison):
    """(acc, m, l) buffers of every split; a single split writes the output directly and gets ``spare`` (never
    dereferenced) instead."""
    if n_splits == 1:
        return spare, spare, spare
    return (_alloc.empty((n_row_groups, n_splits, rows, block_d), torch.float32, device, poison),
            _alloc.empty((n_row_groups, n_splits, rows), torch.float32, device, poison),
            _alloc.empty((n_row_groups, n_splits, rows), torch.float32, device, poison))


def next_power_of_2(n: int) -> int:
    """``triton.next_power_of_2`` in plain Python: Triton 3.9's goes through a JIT function's call path (~4 us a
    call, six per decode launch, on the host time of every eager decode step)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def together_tile(n_rows, n_splits, block_d):
    """(NR, S_TILE) of the "together" merge: all rows (padded to a power of two) and the splits that fit in
    TOGETHER_ELEMENTS per round (at least one)."""
    nr = next_power_of_2(n_rows)
    fit = max(1, TOGETHER_ELEMENTS // (nr * block_d))
    return nr, min(next_power_of_2(n_splits), 1 << (fit.bit_length() - 1))


def merge_walk(n_rows, n_splits, block_d):
    """How the merging program walks the partials: "together" (every row, S_TILE splits per load round), "rows" (one
    row, ROW_MERGE_TILE splits per round) or "splits" (one split of every row per round): the one with the fewest
    dependent load rounds."""
    rounds = {"rows": n_rows * math.ceil(n_splits / ROW_MERGE_TILE), "splits": n_splits}
    nr, s_tile = together_tile(n_rows, n_splits, block_d)
    # Measured on the H200 up to head_dim 128 (wider heads keep the walks verified there), and only where one split
    # of every row fits the budget.
    if block_d <= 128 and nr * block_d <= TOGETHER_ELEMENTS:
        rounds = {"together": math.ceil(n_splits / s_tile), **rounds}
    return min(rounds, key=rounds.get)  # ties: the order above


def decode_attention(q, k, v, kv_indices, kv_counts, opts, kv_start, kv_end, col_bias, head_gain,
                     active, need_lse=True, from_start=False):
    """Same contract as the forward kernel for Tq <= block_q (one query block); ``from_start``: the lists count
    from each row's ``kv_start`` (``block_sparse_attention``'s ``lists_from_start``)."""
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    kv_start, kv_end = pad_bounds(q, k, kv_start, kv_end)
    heads = heads_per_program(q, k, kv_indices, col_bias)
    rows = max(16, next_power_of_2(heads * Tq))
    block_d = max(16, next_power_of_2(D))
    n_groups = Hq // heads
    n_splits = choose_splits(B * n_groups, kv_indices.shape[-1], q.device, heads, opts.kernel.decode_programs_per_sm)
    poison = opts.kernel.poison_outputs

    counters = _alloc.counters(B * n_groups, q.device, "decode_merge")
    spare = _alloc.spare(q.device)  # an fp32 pointer for buffers a launch never touches
    parts = _partials(B * n_groups, n_splits, rows, block_d, q.device, spare, poison)
    out = _alloc.empty((B, Tq, Hq, D), q.dtype, q.device, poison).transpose(1, 2)
    lse = _alloc.empty((B, Hq, Tq), torch.float32, q.device, poison) if need_lse else None
    hooks = hook_args(q, k, kv_indices, col_bias, head_gain, active, kv_start, kv_end)
    consts = dict(hooks["consts"], HEADS=heads, ROWS=rows, HEAD_DIM=D, BLOCK_D=block_d,
                  WRITE_LSE=need_lse)
    split_args = (q, k, v, *parts, kv_indices, kv_counts, *hooks["ptrs"],
                  out, lse if need_lse else spare, counters,
                  *softmax_scales(opts), *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                  *list_strides(kv_indices), *list_strides(kv_counts), *hooks["strides"],
                  *out.stride()[:3], Hq, Tq, Tk)
    # The merge walk only matters when there is a merge; pinned otherwise so it makes no second variant.
    walk = merge_walk(heads * Tq, n_splits, block_d) if n_splits > 1 else "splits"
    nr, s_tile = together_tile(heads * Tq, n_splits, block_d) if walk == "together" else (1, 1)
    split_consts = dict(consts, BK=opts.block_k, CAUSAL=opts.causal,
                        HAS_SOFTCAP=opts.softcap is not None, DOT_PRECISION=dot_precision(q.dtype),
                        MERGE_TILE=MERGE_TILE, MERGE_ROWS=walk == "rows", ROW_TILE=ROW_MERGE_TILE,
                        MERGE_TOGETHER=walk == "together", NR=nr, S_TILE=s_tile, FROM_START=from_start,
                        **pdl_options(q.device, opts.kernel.pdl))
    launch(_decode_tuned, lambda meta: (n_splits, B * n_groups), split_args, split_consts,
           dict(BLOCK_N=min(opts.block_k, 64)), q.device, opts.kernel.autotune)
    return out, lse
