"""Triton decode-time block top-k in one launch, no host sync.

Grid: (chunk of key blocks, KV head, batch).  Every program scores its chunk's mean keys against the GQA group's
query rows (one read of the compressed key cache per group); the program owning the newest block first recomputes
that block's mean from the keys (``tail``), so the cache update costs no launch of its own.  Then the programs of a
(batch, KV head) count their arrivals on an int32 counter; the last to arrive holds the group's score rows in
registers (one row per list head), takes the sink and local blocks, then repeatedly the best remaining block while
the estimated softmax mass is below ``mass`` (at most ``top_k`` times), writes the chosen blocks as ascending
lists (a prefix sum gives each its slot) and resets the counter for the next call or CUDA-graph replay.
At batch 1 a decode step is latency-bound, so launches are what count: this replaces the mean update (2 torch
ops), the scoring and the selection kernels (bench/decode/breakdown_run1.csv: 9 + 19 + 11 us graphed).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..blocksparse import _alloc
# triton.language's own max/argmax/cumsum are jit functions made at import, which the CPU interpreter (switched
# on later in tests) cannot call; tl.reduce / tl.associative_scan with our combine functions work everywhere.
from ..blocksparse.triton_fwd import _add, reduce_max, reduce_sum

SCORE_CHUNK = 64
# Score elements (list heads of a group x key blocks, both padded to powers of two) the selecting program holds in
# registers; longer caches use the torch path.
MAX_SELECT_ELEMENTS = 32768


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
def _score_chunk(Q, Means, Scores, K, b, hkv, chunk, n_k, kv_len, sqb, sqh, smb, smh, smn, ssb, ssh,
                 skb, skh, skt, GROUP: tl.constexpr, ROWS: tl.constexpr, PER_HEAD: tl.constexpr,
                 REDUCE_MAX: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
                 TAIL: tl.constexpr, BK: tl.constexpr):
    """Scores of one chunk of key blocks, stored per list head (a q head, or the group's reduced score)."""
    r = tl.arange(0, ROWS)
    d = tl.arange(0, BLOCK_D)
    n = chunk * CHUNK + tl.arange(0, CHUNK)
    row_ok = r < GROUP
    d_ok = d < HEAD_DIM
    n_ok = n < n_k
    q = tl.load(Q + b * sqb + (hkv * GROUP + r[:, None]) * sqh + d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                other=0.0).to(tl.float32)
    means_ptr = Means + b * smb + hkv * smh
    m_t = tl.load(means_ptr + n[None, :] * smn + d[:, None], mask=n_ok[None, :] & d_ok[:, None],
                  other=0.0).to(tl.float32)
    if TAIL:
        if chunk == (n_k - 1) // CHUNK:  # this program owns the newest block: refresh its mean first
            tail = _tail_mean(K, skb, skh, skt, b, hkv, kv_len, d, d_ok, BK)
            tl.store(means_ptr + (n_k - 1) * smn + d, tail.to(Means.dtype.element_ty), mask=d_ok)
            m_t = tl.where(n[None, :] == n_k - 1, tail[:, None], m_t)
    s = tl.dot(q, m_t, input_precision="ieee")  # [ROWS, CHUNK] exact fp32, like the torch path
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
def _select_rows(Scores, Idx, Cnt, b, h0, ssb, ssh, sib, sih, scb, n_k, top_k, sink_blocks, local_blocks, mass,
                 inv_root_d, LIST_HEADS: tl.constexpr, LH_POW2: tl.constexpr, WIDTH: tl.constexpr,
                 USE_MASS: tl.constexpr, NK_POW2: tl.constexpr):
    """Block lists of list heads h0 .. h0 + LIST_HEADS - 1 from their score rows (one row per head, in registers)."""
    h = tl.arange(0, LH_POW2)
    h_ok = h < LIST_HEADS
    cols = tl.arange(0, NK_POW2)
    valid = h_ok[:, None] & (cols < n_k)[None, :]
    # .cg: the rows were written by other programs of this launch; read them from L2, not from a stale L1 line.
    raw = tl.load(Scores + b * ssb + (h0 + h[:, None]) * ssh + cols[None, :], mask=valid, other=float("-inf"),
                  cache_modifier=".cg")
    logits = raw * inv_root_d
    top = reduce_max(logits, 1)
    top = tl.where(top == float("-inf"), 0.0, top)
    total = top + tl.log(reduce_sum(tl.where(valid, tl.exp(logits - top[:, None]), 0.0), 1))
    forced = valid & ((cols < sink_blocks) | (cols > n_k - 1 - local_blocks))[None, :]
    acc = reduce_sum(tl.where(forced, tl.exp(logits - total[:, None]), 0.0), 1)
    chosen = forced
    left = tl.where(forced | ~valid, float("-inf"), logits)
    cols2 = cols[None, :] + h[:, None] * 0
    for _ in range(0, top_k):
        best, at = tl.reduce((left, cols2), 1, _first_max)
        take = best > float("-inf")
        if USE_MASS:
            take = take & (acc < mass)
        hit = (cols2 == at[:, None]) & take[:, None]
        chosen = chosen | hit
        acc += tl.where(take, tl.exp(best - total), 0.0)
        left = tl.where(cols2 == at[:, None], float("-inf"), left)
    ones = chosen.to(tl.int32)
    slot = tl.associative_scan(ones, 1, _add) - 1
    count = reduce_sum(ones, 1)
    row_idx = Idx + b * sib + (h0 + h) * sih
    tl.store(row_idx[:, None] + slot, cols2, mask=chosen)
    w = tl.arange(0, WIDTH)
    tl.store(row_idx[:, None] + w[None, :], w[None, :] * 0, mask=h_ok[:, None] & (w[None, :] >= count[:, None]))
    tl.store(Cnt + b * scb + h0 + h, count, mask=h_ok)


@triton.jit
def _decode_topk_kernel(Q, Means, K, Scores, Idx, Cnt, Counter, sqb, sqh, smb, smh, smn, ssb, ssh, sib, sih, scb,
                        skb, skh, skt, n_k, kv_len, top_k, sink_blocks, local_blocks, mass, inv_root_d,
                        GROUP: tl.constexpr, ROWS: tl.constexpr, PER_HEAD: tl.constexpr, REDUCE_MAX: tl.constexpr,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, TAIL: tl.constexpr,
                        BK: tl.constexpr, LIST_HEADS: tl.constexpr, LH_POW2: tl.constexpr, WIDTH: tl.constexpr,
                        USE_MASS: tl.constexpr, NK_POW2: tl.constexpr):
    chunk = tl.program_id(0)
    hkv = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    n_chunks = tl.num_programs(0)
    _score_chunk(Q, Means, Scores, K, b, hkv, chunk, n_k, kv_len, sqb, sqh, smb, smh, smn, ssb, ssh, skb, skh, skt,
                 GROUP, ROWS, PER_HEAD, REDUCE_MAX, HEAD_DIM, BLOCK_D, CHUNK, TAIL, BK)
    # Every thread's score stores precede (barrier) the release by the thread doing the atomic; its acquire side
    # makes all the group's scores visible to the last program.
    tl.debug_barrier()
    counter = Counter + b * tl.num_programs(1) + hkv
    arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
    if arrived == n_chunks - 1:
        tl.debug_barrier()
        _select_rows(Scores, Idx, Cnt, b, hkv * LIST_HEADS, ssb, ssh, sib, sih, scb, n_k, top_k, sink_blocks,
                     local_blocks, mass, inv_root_d, LIST_HEADS, LH_POW2, WIDTH, USE_MASS, NK_POW2)
        tl.store(counter, 0)  # every chunk has arrived: ready for the next launch


def fits(n_heads_per_list_group: int, n_k: int) -> bool:
    """Whether one program can hold a group's score rows (else the caller takes the torch path)."""
    return triton.next_power_of_2(n_heads_per_list_group) * max(16, triton.next_power_of_2(n_k)) <= MAX_SELECT_ELEMENTS


def decode_block_topk_triton(q, k_means, *, top_k, sink_blocks, local_blocks, mass, per_head, reduce, width,
                             tail=None):
    B, Hq, D = q.shape
    Hkv, n_k = k_means.shape[1], k_means.shape[2]
    group = Hq // Hkv
    heads = Hq if per_head else Hkv
    list_heads = group if per_head else 1
    scores = _alloc.empty((B, heads, n_k), torch.float32, q.device)
    # The list buffer is padded to a power of two for the kernel's zero fill; callers see ``width`` entries.
    width_pow2 = triton.next_power_of_2(width)
    idx = _alloc.empty((B, heads, 1, width_pow2), torch.int32, q.device)
    counts = _alloc.empty((B, heads, 1), torch.int32, q.device)
    # tail = (keys [B, Hkv, T, D], T, block): the newest block's mean is recomputed (in place) before scoring.
    keys, kv_len, block = tail if tail is not None else (k_means, 0, 16)
    nk_pow2 = max(16, triton.next_power_of_2(n_k))
    _decode_topk_kernel[(triton.cdiv(n_k, SCORE_CHUNK), Hkv, B)](
        q, k_means, keys, scores, idx, counts, _alloc.counters(B * Hkv, q.device, "decode_topk"),
        q.stride(0), q.stride(1), *k_means.stride()[:3], scores.stride(0), scores.stride(1), idx.stride(0),
        idx.stride(1), counts.stride(0), *keys.stride()[:3], n_k, kv_len, min(top_k, n_k), sink_blocks,
        local_blocks, float(mass), D ** -0.5,
        GROUP=group, ROWS=max(16, triton.next_power_of_2(group)), PER_HEAD=per_head, REDUCE_MAX=reduce == "max",
        HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), CHUNK=SCORE_CHUNK, TAIL=tail is not None,
        BK=block, LIST_HEADS=list_heads,
        LH_POW2=triton.next_power_of_2(list_heads), WIDTH=width_pow2, USE_MASS=mass < 1.0, NK_POW2=nk_pow2,
        num_warps=4 if nk_pow2 * triton.next_power_of_2(list_heads) <= 4096 else 8)
    return idx[..., :width], counts
