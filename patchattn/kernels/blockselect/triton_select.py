"""Triton decode-time block top-k: two launches, no host sync.

``_scores_kernel``: one program per (chunk of key blocks, KV head, batch) scores the chunk's mean keys against the
GQA group's query rows (one read of the compressed key cache per group); the program owning the newest block first
recomputes that block's mean from the keys (``tail``), so the cache update needs no launch of its own.
``_select_kernel``: one program per (list head, batch) holds its row of scores in registers and takes the sink and
local blocks plus the best ``top_k`` others, found as a threshold by bisection on the scores' order-preserving
integer keys (ties at the threshold go to the lowest block index, like the oracle), or, with a mass budget below
1, one by one while the estimated softmax mass is below it.  The chosen blocks are written as ascending lists (a
prefix sum gives each its slot).
At batch 1 a decode step is latency-bound (bench/decode/breakdown_run*.csv, profile_*.log): the mean update's own
launches and a top-k loop of 24 dependent arg-max reductions (~11 us) were what this replaced.  Measured and
dropped: a one-launch variant where the last scoring program of each KV group selected for the group's four heads
(65 vs 30 us), a 4-pass radix select with ``tl.histogram`` and multi-pivot searches (no faster).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..blocksparse import _alloc
# triton.language's own max/argmax/cumsum are jit functions made at import, which the CPU interpreter (switched
# on later in tests) cannot call; tl.reduce / tl.associative_scan with our combine functions work everywhere.
from ..blocksparse.triton_fwd import INTERPRETING, _add, pdl_options, reduce_max, reduce_sum, wait_for_previous_kernel

SCORE_CHUNK = 64
# Rows of scores one selection program holds in registers; longer caches use the torch path.
MAX_BLOCKS = 16384
# Score products: exact fp32 FMAs ("ieee", what the interpreter runs) or fp32 split into three TF32 products on
# tensor cores ("tf32x3", ~1e-7 relative error; H200, 128k keys: 6.4 vs 12.4 us, bench/decode/profile_precision.log).
SCORE_PRECISION = "ieee" if INTERPRETING else "tf32x3"
# The k-th-value search alternates pivots halving the interval of values and of keys (see _top_by_threshold).
# Measured and removed: pivots halving the keys only (selection 8.1 vs 6.3 us, bench/decode/select_search/), several
# pivots per round in one 2-D reduction (H200, 2048 blocks: 1 pivot 10.8 us, 4 -> 12.3, 8 -> 14.2,
# bench/decode/profile_select.log).  Warps per program: KernelOptions.score_warps / select_warps (None: by size; the
# selection is a chain of reductions over one row, so fewer warps mean fewer cross-warp barriers per reduction).


@triton.jit
def _first_max(v1, i1, v2, i2):
    better = (v1 > v2) | ((v1 == v2) & (i1 < i2))
    return tl.where(better, v1, v2), tl.where(better, i1, i2)


@triton.jit
def _tail_mean(K, skb, skh, skt, b, hkv, kv_len, d, d_ok, BK: tl.constexpr):
    """Mean of the newest key block's real rows, ``[BLOCK_D]`` fp32."""
    start = ((kv_len - 1) // BK) * BK
    rows = start + tl.arange(0, BK)
    keys = tl.load(K + b * skb + hkv * skh + rows[:, None] * skt + d[None, :],
                   mask=(rows < kv_len)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    return reduce_sum(keys, 0) / (kv_len - start).to(tl.float32)


@triton.jit
def _row_tail_mean(K, skb, skh, skt, b, hkv, first, last, d, d_ok, BK: tl.constexpr):
    """Mean of keys ``[first, last)`` (at most ``BK``: one row's newest block), ``[BLOCK_D]`` fp32."""
    rows = first + tl.arange(0, BK)
    keys = tl.load(K + b * skb + hkv * skh + rows[:, None] * skt + d[None, :],
                   mask=(rows < last)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    return reduce_sum(keys, 0) / tl.maximum(last - first, 1).to(tl.float32)


@triton.jit
def _scores_kernel(Q, Means, Scores, K, Starts, Lengths, n_k, kv_len, sqb, sqh, smb, smh, smn, ssb, ssh, skb, skh,
                   skt, GROUP: tl.constexpr, ROWS: tl.constexpr, PER_HEAD: tl.constexpr, REDUCE_MAX: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, TAIL: tl.constexpr,
                   BY_ROW: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr, NATIVE: tl.constexpr,
                   PDL: tl.constexpr):
    """Scores of one chunk of key blocks, stored per list head (a q head, or the group's reduced score).  BY_ROW:
    row ``b`` holds ``Lengths[b]`` keys from ``Starts[b]`` (its newest block is the one the tail refreshes)."""
    wait_for_previous_kernel(PDL)
    chunk = tl.program_id(0)
    hkv = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    r = tl.arange(0, ROWS)
    d = tl.arange(0, BLOCK_D)
    n = chunk * CHUNK + tl.arange(0, CHUNK)
    row_ok = r < GROUP
    d_ok = d < HEAD_DIM
    n_ok = n < n_k
    # NATIVE (16-bit queries and means, the cache's own dtype): exact products on tensor cores with fp32 sums;
    # otherwise fp32 operands through PRECISION.
    dot_dtype: tl.constexpr = Q.dtype.element_ty if NATIVE else tl.float32
    q = tl.load(Q + b * sqb + (hkv * GROUP + r[:, None]) * sqh + d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                other=0.0).to(dot_dtype)
    means_ptr = Means + b * smb + hkv * smh
    m_t = tl.load(means_ptr + n[None, :] * smn + d[:, None], mask=n_ok[None, :] & d_ok[:, None],
                  other=0.0).to(dot_dtype)
    if TAIL and BY_ROW:
        length = tl.load(Lengths + b).to(tl.int64)
        newest = tl.maximum((length + BK - 1) // BK - 1, 0)  # an empty row refreshes its (unread) block 0
        if chunk == newest // CHUNK:  # this program owns the row's newest block: refresh its mean first
            start = tl.load(Starts + b).to(tl.int64)
            tail = _row_tail_mean(K, skb, skh, skt, b, hkv, start + newest * BK, start + length, d, d_ok,
                                  BK).to(Means.dtype.element_ty)
            tl.store(means_ptr + newest * smn + d, tail, mask=d_ok)
            m_t = tl.where(n[None, :] == newest, tail.to(dot_dtype)[:, None], m_t)
    elif TAIL:
        if chunk == (n_k - 1) // CHUNK:  # this program owns the newest block: refresh its mean first
            # Scored as stored (rounded to the cache's dtype), as the torch path scores it.
            tail = _tail_mean(K, skb, skh, skt, b, hkv, kv_len, d, d_ok, BK).to(Means.dtype.element_ty)
            tl.store(means_ptr + (n_k - 1) * smn + d, tail, mask=d_ok)
            m_t = tl.where(n[None, :] == n_k - 1, tail.to(dot_dtype)[:, None], m_t)
    if NATIVE:
        s = tl.dot(q, m_t, out_dtype=tl.float32)  # [ROWS, CHUNK] fp32 sums of exact products
    else:
        s = tl.dot(q, m_t, input_precision=PRECISION)  # [ROWS, CHUNK] fp32 (3xTF32 on tensor cores on a GPU)
    if PER_HEAD:
        tl.store(Scores + b * ssb + (hkv * GROUP + r[:, None]) * ssh + n[None, :], s,
                 mask=row_ok[:, None] & n_ok[None, :])
    else:
        if REDUCE_MAX:
            s = reduce_max(tl.where(row_ok[:, None], s, float("-inf")), 0)
        else:
            s = reduce_sum(s, 0) / GROUP
        tl.store(Scores + b * ssb + hkv * ssh + n, s, mask=n_ok)


@triton.jit
def _key_to_value(key):
    """The float32 whose order-preserving integer key is ``key`` (an int64 scalar in int32 range)."""
    k32 = key.to(tl.int32)
    return (k32 ^ tl.where(k32 < 0, 0x7FFFFFFF, 0)).to(tl.float32, bitcast=True)


@triton.jit
def _value_to_key(value):
    """The order-preserving int32 key of a float32 (signed-int order = float order)."""
    bits = value.to(tl.int32, bitcast=True)
    return bits ^ tl.where(bits < 0, 0x7FFFFFFF, 0)


@triton.jit
def _top_by_threshold(scores, cand, k):
    """Mask of the ``k`` largest ``scores`` among ``cand`` (ties: lowest index).

    The k-th largest value is searched for on the scores' order-preserving integer keys: each round counts the
    candidates at or above one pivot (one reduction) and keeps the interval holding the k-th; then every candidate
    above it and the first of those equal to it are taken.  The search stops early at a pivot with exactly ``need``
    candidates at or above it.  Every other pivot halves the interval of *values* (the others that of keys), which is much narrower than the keys' around the
    k-th of a bell-shaped row (2021 Gaussian scores, k = 24: 9.4 rounds instead of 14.4 on average; heavy-tailed
    rows take more, bench/decode/select_search/simulate_rounds.txt), while the key halvings keep the worst case
    within ~64 rounds (keys alone: ~32).  H200, 128k keys, batch 1: selection 8.1 (keys alone) -> 6.3 us.  Picking the best ``k`` one by one would cost
    ``k`` dependent arg-max reductions.
    """
    ordered = _value_to_key(scores)
    need = tl.minimum(k, reduce_sum(cand.to(tl.int32), 0))
    lo = -reduce_max(tl.where(cand, -ordered, -2147483647), 0).to(tl.int64)  # smallest candidate key
    hi = reduce_max(tl.where(cand, ordered, -2147483647), 0).to(tl.int64)  # largest
    # Invariant: at least `need` candidates are >= lo, fewer than `need` are > hi.  lo, hi, pivots: int64 (no
    # overflow); every pivot lies between two keys, so comparing in int32 is exact.
    value_next = need * 0 + 1
    while lo < hi:
        pivot = lo + (hi - lo + 1) // 2
        low = _key_to_value(lo)
        by_value = tl.minimum(tl.maximum(_value_to_key(low + (_key_to_value(hi) - low) * 0.5).to(tl.int64),
                                         lo + 1), hi)
        pivot = tl.where(value_next > 0, by_value, pivot)
        value_next = 1 - value_next
        count = reduce_sum((cand & (ordered >= pivot.to(tl.int32))).to(tl.int32), 0)
        lo = tl.where(count >= need, pivot, lo)
        hi = tl.where(count >= need, hi, pivot - 1)
        hi = tl.where(count == need, lo, hi)  # exactly `need` at or above the pivot: it splits the set
    above = cand & (ordered > lo.to(tl.int32))
    tied = cand & (ordered == lo.to(tl.int32))
    rank = tl.associative_scan(tied.to(tl.int32), 0, _add) - 1
    return (above | (tied & (rank < need - reduce_sum(above.to(tl.int32), 0)))) & (need > 0)


@triton.jit
def _top_by_mass(logits, valid, forced, k, mass, cols):
    """The best candidates one by one while the estimated softmax mass (forced blocks first) is below ``mass``."""
    top = reduce_max(logits, 0)
    total = top + tl.log(reduce_sum(tl.where(valid, tl.exp(logits - top), 0.0), 0))
    acc = reduce_sum(tl.where(forced, tl.exp(logits - total), 0.0), 0)
    chosen = cols < 0  # all False
    left = tl.where(forced | ~valid, float("-inf"), logits)
    for _ in range(0, k):
        best, at = tl.reduce((left, cols), 0, _first_max)
        take = (best > float("-inf")) & (acc < mass)
        chosen = chosen | tl.where(take, cols == at, False)
        acc += tl.where(take, tl.exp(best - total), 0.0)
        left = tl.where(cols == at, float("-inf"), left)
    return chosen


@triton.jit
def _choose_blocks(raw, cols, n_visible, top_k, sink_blocks, local_blocks, mass, inv_root_d, USE_MASS: tl.constexpr):
    """One row's choice among its ``n_visible`` blocks: the sink and local blocks (the last ``local_blocks`` visible
    ones), then the ``top_k`` best others or, with USE_MASS, the best while the estimated mass is below ``mass``."""
    valid = cols < n_visible
    forced = valid & ((cols < sink_blocks) | (cols > n_visible - 1 - local_blocks))
    if USE_MASS:
        chosen = _top_by_mass(raw * inv_root_d, valid, forced, top_k, mass, cols)
    else:
        chosen = _top_by_threshold(raw, valid & ~forced, top_k)
    return chosen | forced


@triton.jit
def _write_ascending(row_ptr, chosen, cols):
    """Store the chosen columns at their prefix-sum slots of ``row_ptr`` (ascending); returns how many."""
    ones = chosen.to(tl.int32)
    slot = tl.associative_scan(ones, 0, _add) - 1
    tl.store(row_ptr + slot, cols, mask=ones > 0)
    return reduce_sum(ones, 0)


@triton.jit
def _select_kernel(Scores, Idx, Cnt, Lengths, ssb, ssh, sib, sih, scb, n_k, top_k, sink_blocks, local_blocks, mass,
                   inv_root_d, WIDTH: tl.constexpr, USE_MASS: tl.constexpr, NK_POW2: tl.constexpr,
                   BY_ROW: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)  # the scores come from the kernel just before
    h = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, NK_POW2)
    if BY_ROW:  # the row's own blocks only (a shorter row's other columns score stale or unset means)
        n_visible = (tl.load(Lengths + b) + BK - 1) // BK
    else:
        n_visible = n_k
    raw = tl.load(Scores + b * ssb + h * ssh + cols, mask=cols < n_visible, other=float("-inf"))
    chosen = _choose_blocks(raw, cols, n_visible, top_k, sink_blocks, local_blocks, mass, inv_root_d, USE_MASS)
    count = _write_ascending(Idx + b * sib + h * sih, chosen, cols)
    w = tl.arange(0, WIDTH)
    tl.store(Idx + b * sib + h * sih + w, w * 0, mask=w >= count)
    tl.store(Cnt + b * scb + h, count)


def native_16_bit(q, k_means) -> bool:
    """Whether the scores can multiply the 16-bit operands as they are (not under the interpreter, whose bf16 dot is
    wrong: there they are upcast, which gives the same exact products)."""
    return not INTERPRETING and q.dtype == k_means.dtype and q.dtype in (torch.bfloat16, torch.float16)


def decode_block_topk_triton(q, k_means, *, top_k, sink_blocks, local_blocks, mass, per_head, reduce, width,
                             options, tail=None, rows=None):
    """Decode lists (see ``decode_block_topk``); ``options``: a ``KernelOptions`` (poisoning, warps, launch).
    ``rows``: ``(keys or None, starts, lengths, block)`` for rows of different lengths (``[B]`` int tensors)."""
    B, Hq, D = q.shape
    Hkv, n_k = k_means.shape[1], k_means.shape[2]
    group = Hq // Hkv
    heads = Hq if per_head else Hkv
    poison = options.poison_outputs
    scores = _alloc.empty((B, heads, n_k), torch.float32, q.device, poison)
    # tail = (keys [B, Hkv, T, D], T, block): the newest block's mean is recomputed (in place) before scoring.
    keys, kv_len, block = tail if tail is not None else (k_means, 0, 16)
    starts = lengths = k_means  # placeholders (not read) unless rows are given
    if rows is not None:
        row_keys, starts, lengths, block = rows
        keys = row_keys if row_keys is not None else k_means
    _scores_kernel[(triton.cdiv(n_k, SCORE_CHUNK), Hkv, B)](
        q, k_means, scores, keys, starts, lengths, n_k, kv_len, q.stride(0), q.stride(1), *k_means.stride()[:3],
        scores.stride(0), scores.stride(1), *keys.stride()[:3], GROUP=group, ROWS=max(16, triton.next_power_of_2(group)),
        PER_HEAD=per_head, REDUCE_MAX=reduce == "max", HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
        CHUNK=SCORE_CHUNK, TAIL=tail is not None or (rows is not None and rows[0] is not None),
        BY_ROW=rows is not None, BK=block, PRECISION=SCORE_PRECISION,
        NATIVE=native_16_bit(q, k_means), num_warps=options.score_warps or 4, **pdl_options(q.device, options.pdl))
    # The list buffer is padded to a power of two for the kernel's zero fill; callers see ``width`` entries.
    width_pow2 = triton.next_power_of_2(width)
    idx = _alloc.empty((B, heads, 1, width_pow2), torch.int32, q.device, poison)
    counts = _alloc.empty((B, heads, 1), torch.int32, q.device, poison)
    nk_pow2 = max(16, triton.next_power_of_2(n_k))
    _select_kernel[(heads, B)](
        scores, idx, counts, lengths, scores.stride(0), scores.stride(1), idx.stride(0), idx.stride(1),
        counts.stride(0), n_k, min(top_k, n_k), sink_blocks, local_blocks, float(mass), D ** -0.5, WIDTH=width_pow2,
        USE_MASS=mass < 1.0, NK_POW2=nk_pow2, BY_ROW=rows is not None, BK=block,
        num_warps=options.select_warps or (4 if nk_pow2 <= 4096 else 8), **pdl_options(q.device, options.pdl))
    return idx[..., :width], counts
