"""Triton forward kernel for block-sparse flash attention (prefill), plus the jit helpers that the
backward and decode kernels share.

One program = one (batch, q head, query tile of BLOCK_M rows). A prefix scan splits the query block's sorted
key-block list into three stretches so the mask arithmetic runs only where it can change a score:
  head  - blocks straddling ``kv_start`` (left padding): masked
  clean - blocks every row of the tile sees completely: no mask
  tail  - blocks crossing the causal diagonal / ``kv_end`` / ``Tk``: masked
and walks them in one software-pipelined loop, the mask behind a branch per sub-tile (a short sparse list pays one
pipeline fill; a loop per stretch was 3-14% slower on the H200, bench/kernel/RESULTS.md, and was removed).
Blocks entirely before ``kv_start`` or entirely invisible are never loaded.  Partial tiles (``HAS_TILES``): an entry
whose tile id is >= 0 also loads its ``[BLOCK_M, BLOCK_N]`` slice of the element mask and ANDs it in, behind a second
branch, so whole tiles (id -1) run exactly the code they run without tiles.  Scores live in log2
units (``scale * log2(e)`` folded in) so the softmax uses exp2.  Launch options (autotuning, programmatic dependent
launch, interpreter tiles) come in ``opts.kernel`` (:class:`patchattn.kernels.KernelOptions`).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from . import _alloc

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
_HOPPER_OR_NEWER: dict = {}


def hopper_or_newer(device) -> bool:
    """Whether compiled kernels on ``device`` can use sm_90 features (TMA descriptors, griddepcontrol); cached per
    device, False under the interpreter and off CUDA."""
    if INTERPRETING or device.type != "cuda":
        return False
    if device not in _HOPPER_OR_NEWER:
        _HOPPER_OR_NEWER[device] = torch.cuda.get_device_capability(device)[0] >= 9
    return _HOPPER_OR_NEWER[device]


def pdl_launch(device, pdl: bool) -> bool:
    """Whether kernels on ``device`` are launched with programmatic dependent launch: asked for
    (``KernelOptions.pdl``), compiled, sm_90+.  Each decode-step kernel (block scores, block choice, split-K attention)
    is then launched while the kernel before it finishes and waits on the device (griddepcontrol) before it touches
    memory, so a step's kernel boundaries and the one into the next layer cost less launch latency, in eager streams
    and in CUDA graphs alike."""
    return pdl and hopper_or_newer(device)


def pdl_options(device, pdl: bool) -> dict:
    """Launch options for a kernel with a ``PDL`` constexpr: that flag, plus the launch attribute when it is on."""
    on = pdl_launch(device, pdl)
    return dict(PDL=on, launch_pdl=True) if on else dict(PDL=False)


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    """Under programmatic dependent launch, wait until the kernel launched before this one has finished and its writes
    are visible (before this kernel reads or writes any memory), then let the next kernel launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()



# ---------------------------------------------------------------------------------------------
# Shared jit helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def load_tile(ptrs, row_ok, d_ok, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a [R, D] tile; masks only what can be out of range (rows and/or padded head_dim)."""
    if MASK_ROWS:
        if EVEN_D:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return x


@triton.jit
def query_tile(Q, pid_bh, Hq, tile, sqb, sqh, sqt, Tq, Tk, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_M: tl.constexpr):
    """A program's query tile: ``(b, h, rows, row_ok, rows_pos, offs_d, d_ok, q [BLOCK_M, BLOCK_D])`` for program
    ``pid_bh`` (= b * Hq + h), with the rows' key positions ``rows_pos`` (queries are the last Tq keys) and the head
    dim padded to ``BLOCK_D``."""
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Tq
    rows_pos = rows + (Tk - Tq)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = load_tile(Q + b * sqb + h * sqh + rows[:, None] * sqt + offs_d[None, :], row_ok, d_ok,
                  True, HEAD_DIM == BLOCK_D)
    return b, h, rows, row_ok, rows_pos, offs_d, d_ok, q


@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr):
    """a @ b (+ acc) in fp32. "upcast" is for the CPU interpreter, whose bf16 dot is wrong."""
    if DOT_PRECISION == "upcast":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return out


# Reductions and tanh built from core ops only: triton's own jit'ed helpers (tl.sum, tl.max,
# tl.zeros, tl.sigmoid) are compiled for the mode triton was imported in, so they break under the
# interpreter when something imported triton before TRITON_INTERPRET was set. Ours are compiled
# lazily, at first use, and run in either mode.
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def reduce_sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _add)


@triton.jit
def reduce_max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _maximum)


@triton.jit
def tanh(x):
    return 1.0 - 2.0 / (tl.math.exp2(x * 2.8853900817779268) + 1.0)  # 2 * log2(e)


@triton.jit
def list_ranges(list_ptr, stride_entry, count, kv_lo, full_lim, part_lim,
                BK: tl.constexpr, SCAN: tl.constexpr):
    """Counts over a sorted key-block list: blocks ending at or before kv_lo, starting before kv_lo,
    ending at or before full_lim (fully visible), starting before part_lim (partly visible)."""
    n_before = count * 0
    n_lo = count * 0
    n_full = count * 0
    n_vis = count * 0
    for c in range(0, count, SCAN):
        offs = c + tl.arange(0, SCAN)
        ok = offs < count
        start = tl.load(list_ptr + offs * stride_entry, mask=ok, other=0) * BK
        end = start + BK
        n_before += reduce_sum((ok & (end <= kv_lo)).to(tl.int32), 0)
        n_lo += reduce_sum((ok & (start < kv_lo)).to(tl.int32), 0)
        n_full += reduce_sum((ok & (end <= full_lim)).to(tl.int32), 0)
        n_vis += reduce_sum((ok & (start < part_lim)).to(tl.int32), 0)
    return n_before, n_lo, n_full, n_vis


@triton.jit
def scores_log2(a, b, cols, bias_ptr, stride_bias_t, Tk, scale_log2, scale_over_cap, cap_log2,
                HAS_SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr, MASK_COLS: tl.constexpr,
                DOT_PRECISION: tl.constexpr, KEYS_ON_ROWS: tl.constexpr):
    """a [R, D] x b [C, D] -> scores [R, C] in log2 units (scale, softcap, column bias applied).
    a = q, b = k normally; a = k, b = q (KEYS_ON_ROWS) for the transposed backward tiles.
    Also returns tanh(.) of the soft-capped scores (the backward needs 1 - tanh^2)."""
    qk = mma(a, tl.trans(b), None, DOT_PRECISION)
    if HAS_SOFTCAP:
        t = tanh(qk * scale_over_cap)
        s = cap_log2 * t
    else:
        t = qk
        s = qk * scale_log2
    if HAS_BIAS:
        if MASK_COLS:
            bias = tl.load(bias_ptr + cols * stride_bias_t, mask=cols < Tk, other=0.0)
        else:
            bias = tl.load(bias_ptr + cols * stride_bias_t)
        bias = bias.to(tl.float32) * 1.4426950408889634
        if KEYS_ON_ROWS:
            s += bias[:, None]
        else:
            s += bias[None, :]
    return s, t


@triton.jit
def apply_tile_mask(s, tile_ids, entry, stride_entry, tile_masks, q_off, k_off,
                    BQ: tl.constexpr, BK: tl.constexpr, KEYS_ON_ROWS: tl.constexpr, MODE: tl.constexpr):
    """Scores of a partial tile (list entry ``entry`` has tile id >= 0) with its element mask applied; whole tiles
    (id -1) keep every score.  ``q_off``/``k_off``: offsets inside the query / key block of the scores' rows and
    columns ([M, N]; [N, M] with KEYS_ON_ROWS).  Offsets are always inside the tile, so no bounds mask.
    ``MODE`` (the HAS_TILES value): 2 = predicated, no branch (the mask load is switched off for whole tiles, so the
    software pipeliner can prefetch it with K and V); 1 = load and select behind a branch (the first version, kept
    for A/B runs: ``KernelOptions.tile_mask_branch``)."""
    tid = tl.load(tile_ids + entry * stride_entry)
    if MODE == 2:
        base = tile_masks + tl.maximum(tid, 0).to(tl.int64) * (BQ * BK)
        if KEYS_ON_ROWS:
            offs = q_off[None, :] * BK + k_off[:, None]
        else:
            offs = q_off[:, None] * BK + k_off[None, :]
        seen = tl.load(base + offs, mask=offs < tl.where(tid >= 0, BQ * BK, 0), other=1)  # whole tiles load nothing
        s = tl.where(seen != 0, s, float("-inf"))
    else:
        if tid >= 0:
            base = tile_masks + tid.to(tl.int64) * (BQ * BK)
            if KEYS_ON_ROWS:
                seen = tl.load(base + q_off[None, :] * BK + k_off[:, None])
            else:
                seen = tl.load(base + q_off[:, None] * BK + k_off[None, :])
            s = tl.where(seen != 0, s, float("-inf"))
    return s


@triton.jit
def visibility(rows_pos, cols, kv_lo, kv_hi, CAUSAL: tl.constexpr, KEYS_ON_ROWS: tl.constexpr):
    """Mask of the (query position, key position) pairs that may attend: [M, N], or [N, M]."""
    if KEYS_ON_ROWS:
        c = cols[:, None]
        r = rows_pos[None, :]
    else:
        c = cols[None, :]
        r = rows_pos[:, None]
    ok = (c >= kv_lo) & (c < kv_hi)
    if CAUSAL:
        ok = ok & (c <= r)
    return ok


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _attend(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, list_ptr, stride_entry,
            j_lo, j_hi, rows_pos, kv_lo, kv_hi, Tk, bias_ptr, stride_bias_t,
            scale_log2, scale_over_cap, cap_log2, offs_d, d_ok,
            clean_lo, clean_hi, tile_ids, stride_tile_entry, tile_masks, q_off,
            BQ: tl.constexpr, BK: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr,
            CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
            HAS_TILES: tl.constexpr, EVEN_TK: tl.constexpr):
    """Online softmax over list entries j_lo..j_hi (counted in BLOCK_N sub-tiles): the entries clean_lo..clean_hi
    skip the visibility mask (a branch per sub-tile), the others take it; partial tiles take their element mask.
    ``EVEN_TK`` (Tk a multiple of the key block): no listed column can pass Tk, so K/V/bias loads take no row mask."""
    SUB: tl.constexpr = BK // BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    for j in range(j_lo, j_hi):
        blk = tl.load(list_ptr + (j // SUB) * stride_entry)
        cols = blk * BK + (j % SUB) * BLOCK_N + offs_n
        col_ok = cols < Tk
        k = load_tile(k_base + cols[:, None] * stride_kt + offs_d[None, :], col_ok, d_ok,
                      not EVEN_TK, EVEN_D)
        s, _t = scores_log2(q, k, cols, bias_ptr, stride_bias_t, Tk, scale_log2, scale_over_cap,
                            cap_log2, HAS_SOFTCAP, HAS_BIAS, not EVEN_TK, DOT_PRECISION, False)
        if (j < clean_lo) | (j >= clean_hi):
            s = tl.where(visibility(rows_pos, cols, kv_lo, kv_hi, CAUSAL, False), s, float("-inf"))
        if HAS_TILES:
            s = apply_tile_mask(s, tile_ids, j // SUB, stride_tile_entry, tile_masks, q_off,
                                (j % SUB) * BLOCK_N + offs_n, BQ, BK, False, HAS_TILES)
        m_new = tl.maximum(m_i, reduce_max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked rows so far
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + reduce_sum(p, 1)
        v = load_tile(v_base + cols[:, None] * stride_vt + offs_d[None, :], col_ok, d_ok,
                      not EVEN_TK, EVEN_D)
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(
        Q, K, V, Out, Lse, KvIdx, KvCnt, KvStart, KvEnd, Bias, Gain, Active, TileIds, TileMasks,
        scale_log2, scale_over_cap, cap_log2,
        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
        sib, sih, siq, sik, scb, sch, scq, sbb, sbh, sbt, sgb, sgt, sgh, sab, sat, sah, stb, sth, stq, stk,
        Hq, Tq, Tk,
        GROUP: tl.constexpr, LIST_DIV: tl.constexpr, BIAS_DIV: tl.constexpr,
        BQ: tl.constexpr, BK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, HAS_GAIN: tl.constexpr, HAS_ACTIVE: tl.constexpr,
        WRITE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr, SCAN: tl.constexpr, HAS_TILES: tl.constexpr,
        EVEN_TK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILES_FASTEST: tl.constexpr):
    # Launch order (tuned): all heads of a query tile together (they share K/V in L2 under GQA),
    # or all tiles of a head together. Heavy (late, causal) tiles go first either way.
    if TILES_FASTEST:
        pid_bh = tl.program_id(1)
        tile = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        pid_bh = tl.program_id(0)
        tile = tl.num_programs(1) - 1 - tl.program_id(1)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    b, h, rows, row_ok, rows_pos, offs_d, d_ok, q = query_tile(Q, pid_bh, Hq, tile, sqb, sqh, sqt, Tq, Tk, HEAD_DIM,
                                                               BLOCK_D, BLOCK_M)
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
    if HAS_ACTIVE:  # skip the whole tile when no row of it is active
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

    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    # One pipelined walk: a short list pays one pipeline fill, not one per stretch.
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_base, v_base, skt, svt, list_ptr, sik, n_before * SUB,
                            n_vis * SUB, rows_pos, kv_lo, kv_hi, Tk, bias_ptr, sbt, scale_log2, scale_over_cap,
                            cap_log2, offs_d, d_ok, n_lo * SUB, clean_hi * SUB, tile_ids, stk, TileMasks, q_off,
                            BQ, BK, BLOCK_N, EVEN_D, CAUSAL, HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION, HAS_TILES,
                            EVEN_TK)

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    if HAS_GAIN:
        gain = tl.load(Gain + b * sgb + rows * sgt + h * sgh, mask=row_ok, other=0.0)
        out = out * gain.to(tl.float32)[:, None]
    if HAS_ACTIVE:
        out = tl.where(act[:, None], out, 0.0)
    o_ptrs = Out + b * sob + h * soh + rows[:, None] * sot + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if WRITE_LSE:
        lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453,
                       float("-inf"))
        if HAS_ACTIVE:
            lse = tl.where(act, lse, float("-inf"))
        tl.store(Lse + pid_bh.to(tl.int64) * Tq + rows, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------
def _configs():
    """A small Hopper-oriented search space (x two launch orders); pruned per head_dim and blocks."""
    shapes = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3),
              (128, 32, 4, 4), (64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2), (16, 16, 4, 2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "TILES_FASTEST": order}, num_warps=w,
                          num_stages=s)
            for m, n, w, s in shapes for order in (False, True)]


def prune_configs(configs, named_args, **kwargs):
    """Keep tiles that divide the logical blocks and fit shared memory for this head_dim."""
    bq, bk, d = kwargs["BQ"], kwargs["BK"], kwargs["BLOCK_D"]
    fits = [c for c in configs
            if c.kwargs["BLOCK_M"] <= bq and c.kwargs["BLOCK_N"] <= bk
            and (d <= 128 or (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64
                              and c.num_stages <= 2))]
    big = [c for c in fits if c.kwargs["BLOCK_M"] >= min(bq, 64)]  # prefer few, large tiles
    return (big or fits)[:8] or [configs[-1]]


_fwd_tuned = triton.autotune(
    configs=_configs(), key=["HEAD_DIM", "BQ", "BK", "CAUSAL", "HAS_PAD", "HAS_BIAS", "GROUP", "HAS_TILES", "EVEN_TK"],
    prune_configs_by={"early_config_prune": prune_configs})(_fwd_kernel)


# Chosen config per (kernel, constexprs, dtype). Triton's Autotuner.run rebuilds its key from every
# argument on each call (~0.1 ms of host time here, see bench/kernel/RESULTS.md); after the first
# call we launch the jit function directly with the winner.
TUNED: dict = {}


def launch(tuned, grid, args, consts, interpreter_meta, device, autotune: bool = True, forced=None):
    """Autotuned launch on a GPU; a fixed config under the interpreter, ``forced`` (a ``triton.Config``) when given,
    or without ``autotune`` the first config that compiles."""
    if INTERPRETING or device.type != "cuda":
        tuned.fn[grid(interpreter_meta)](*args, **consts, **interpreter_meta)
        return
    if forced is not None:
        tuned.fn[grid(forced.kwargs)](*args, **consts, **forced.all_kwargs())
        return
    key = (tuned.fn.__name__, device.index, args[0].dtype, tuple(sorted(consts.items())))
    cfg = TUNED.get(key)
    if cfg is None:
        if autotune:
            tuned[grid](*args, **consts)
            TUNED[key] = tuned.best_config
            return
        prune = tuned.early_config_prune
        candidates = list(prune(tuned.configs, None, **consts) if prune else tuned.configs)
        candidates += sorted((c for c in tuned.configs if c not in candidates and _tiles_divide(c, consts)),
                             key=lambda c: (c.kwargs.get("BLOCK_M", 0) * c.kwargs.get("BLOCK_N", 0), c.num_stages))
        # Without timing, take the first config that compiles within the GPU's shared memory (fp32 inputs and
        # head_dim 256 overflow the larger tiles; the autotuner skips those the same way).
        for cfg in candidates[:-1]:
            try:
                tuned.fn[grid(cfg.kwargs)](*args, **consts, **cfg.all_kwargs())
            except triton.runtime.errors.OutOfResources:
                continue
            TUNED[key] = cfg
            return
        cfg = TUNED[key] = candidates[-1]
    tuned.fn[grid(cfg.kwargs)](*args, **consts, **cfg.all_kwargs())


def forced_forward_config(options, block_q: int, block_k: int):
    """``KernelOptions.forward_config`` as a ``triton.Config`` (None when unset), its tiles checked against the
    logical blocks."""
    if options.forward_config is None:
        return None
    block_m, block_n, warps, stages, tiles_fastest = options.forward_config
    if block_m > block_q or block_n > block_k or block_q % block_m or block_k % block_n:
        raise ValueError(f"forward_config tiles {block_m}x{block_n} must divide the blocks {block_q}x{block_k}")
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "TILES_FASTEST": bool(tiles_fastest)},
                         num_warps=warps, num_stages=stages)


def _tiles_divide(cfg, consts) -> bool:
    """Whether a config's tiles fit inside the logical query/key blocks (the kernels' layout needs that)."""
    return (cfg.kwargs.get("BLOCK_M", 0) <= consts.get("BQ", 1 << 30)
            and cfg.kwargs.get("BLOCK_N", 0) <= consts.get("BK", 1 << 30))


def interpreter_tiles(bq, bk, options):
    """Tiles for the CPU interpreter (no autotuning there: every config would run): the logical blocks, or
    ``options.interpreter_tiles`` within them."""
    if options.interpreter_tiles is not None:
        return min(options.interpreter_tiles[0], bq), min(options.interpreter_tiles[1], bk)
    return bq, bk


def dot_precision(dtype):
    if dtype == torch.float32:
        return "ieee"
    return "upcast" if INTERPRETING else "tf32"


def last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def list_strides(t):
    """Strides of a [B', H', ...] tensor with broadcast batch dims given stride 0."""
    return tuple(0 if t.shape[i] == 1 else t.stride(i) for i in range(t.dim()))


def gain_strides(head_gain):
    if head_gain is None:
        return 0, 0, 0
    if head_gain.dim() == 3:  # [B, Tq, Hq]
        return head_gain.stride(0), head_gain.stride(1), head_gain.stride(2)
    return (0 if head_gain.shape[0] == 1 else head_gain.stride(0)), 0, head_gain.stride(1)


def hook_args(q, k, kv_indices, col_bias, head_gain, active, kv_start, kv_end):
    """Pointers, strides and constexprs for the optional inputs, shared by all kernels."""
    Hq, Hkv = q.shape[1], k.shape[1]
    dummy = kv_indices  # any tensor on the device: never dereferenced when its flag is off
    bias_s = list_strides(col_bias) if col_bias is not None else (0, 0, 0)
    act = active.view(torch.uint8) if active is not None else None
    act_s = act.stride() if act is not None else (0, 0, 0)
    return dict(
        ptrs=(kv_start if kv_start is not None else dummy, kv_end if kv_end is not None else dummy,
              col_bias if col_bias is not None else dummy,
              head_gain if head_gain is not None else dummy, act if act is not None else dummy),
        strides=(*bias_s, *gain_strides(head_gain), *act_s),
        consts=dict(GROUP=Hq // Hkv, LIST_DIV=Hq // kv_indices.shape[1],
                    BIAS_DIV=Hq // col_bias.shape[1] if col_bias is not None else 1,
                    HAS_PAD=kv_start is not None or kv_end is not None,
                    HAS_BIAS=col_bias is not None, HAS_GAIN=head_gain is not None,
                    HAS_ACTIVE=active is not None))


def tile_args(kv_indices, tile_masks, tile_mask_ids, branch: bool = False):
    """Pointers, list strides and the constexpr for partial tiles (``tile_mask_ids`` has ``kv_indices``' shape):
    HAS_TILES 0 none, 2 predicated mask loads, 1 behind a branch (``branch``; see :func:`apply_tile_mask`)."""
    if tile_masks is None:
        return {"ptrs": (kv_indices, kv_indices), "strides": (0, 0, 0, 0), "consts": {"HAS_TILES": 0}}
    return {"ptrs": (tile_mask_ids, tile_masks.view(torch.uint8)), "strides": list_strides(tile_mask_ids),
            "consts": {"HAS_TILES": 1 if branch else 2}}


def softmax_scales(opts):
    """(scale*log2e, scale/softcap, softcap*log2e): scores in log2 units, with or without a cap."""
    cap = opts.softcap
    return (opts.scale * LOG2E, opts.scale / cap if cap else 0.0, cap * LOG2E if cap else 0.0)


def pad_bounds(q, k, kv_start, kv_end):
    """kv_start/kv_end both present when either is (the kernels read both)."""
    if kv_start is None and kv_end is None:
        return None, None
    B, Tk = q.shape[0], k.shape[2]
    if kv_start is None:
        kv_start = torch.zeros(B, dtype=torch.int32, device=q.device)
    if kv_end is None:
        kv_end = torch.full((B,), Tk, dtype=torch.int32, device=q.device)
    return kv_start.contiguous(), kv_end.contiguous()


def forward(q, k, v, kv_indices, kv_counts, opts, kv_start, kv_end, col_bias, head_gain, active,
            need_lse, tile_masks=None, tile_mask_ids=None):
    """Launch the forward kernel; returns (out [B, Hq, Tq, D] viewed from a [B, Tq, Hq, D] buffer,
    lse [B, Hq, Tq] fp32 or None)."""
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    kv_start, kv_end = pad_bounds(q, k, kv_start, kv_end)
    # [B, Tq, Hq, D] memory: transformers transposes back to this layout, so that becomes free.
    poison = opts.kernel.poison_outputs
    out = _alloc.empty((B, Tq, Hq, D), q.dtype, q.device, poison).transpose(1, 2)
    lse = _alloc.empty((B, Hq, Tq), torch.float32, q.device, poison) if need_lse else None
    hooks = hook_args(q, k, kv_indices, col_bias, head_gain, active, kv_start, kv_end)
    tiles = tile_args(kv_indices, tile_masks, tile_mask_ids, opts.kernel.tile_mask_branch)
    args = (q, k, v, out, lse if lse is not None else out, kv_indices, kv_counts, *hooks["ptrs"], *tiles["ptrs"],
            *softmax_scales(opts),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            *list_strides(kv_indices), *list_strides(kv_counts), *hooks["strides"], *tiles["strides"], Hq, Tq, Tk)
    consts = dict(hooks["consts"], **tiles["consts"], BQ=opts.block_q, BK=opts.block_k, HEAD_DIM=D,
                  BLOCK_D=max(16, triton.next_power_of_2(D)), CAUSAL=opts.causal,
                  HAS_SOFTCAP=opts.softcap is not None, WRITE_LSE=need_lse,
                  DOT_PRECISION=dot_precision(q.dtype), SCAN=64, EVEN_TK=Tk % opts.block_k == 0)
    bm, bn = interpreter_tiles(opts.block_q, opts.block_k, opts.kernel)

    def grid(meta):
        tiles = triton.cdiv(Tq, meta["BLOCK_M"])
        return (tiles, B * Hq) if meta["TILES_FASTEST"] else (B * Hq, tiles)

    launch(_fwd_tuned, grid, args, consts,
           dict(BLOCK_M=bm, BLOCK_N=bn, TILES_FASTEST=opts.kernel.interpreter_tiles_fastest), q.device,
           opts.kernel.autotune, forced_forward_config(opts.kernel, opts.block_q, opts.block_k))
    return out, lse
