"""Triton decode-time block top-k: two small kernels instead of ~25 torch ops, no host sync.

``_scores_kernel``: one program per (batch, KV head, chunk of key blocks) scores the chunk's mean keys against
the GQA group's query rows (one read of the compressed key cache per group).  ``_select_kernel``: one program
per (batch, list head) holds its row of scores in registers, takes the sink and local blocks, then repeatedly
the best remaining block while the estimated softmax mass is below ``mass`` (at most ``top_k`` times), and
writes the chosen blocks as an ascending list (a prefix sum gives each its slot).
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
# Rows of scores one selection program holds in registers; longer caches use the torch path.
MAX_BLOCKS = 16384


@triton.jit
def _first_max(v1, i1, v2, i2):
    better = (v1 > v2) | ((v1 == v2) & (i1 < i2))
    return tl.where(better, v1, v2), tl.where(better, i1, i2)


@triton.jit
def _scores_kernel(Q, Means, Scores, sqb, sqh, smb, smh, smn, ssb, ssh, n_k,
                   GROUP: tl.constexpr, ROWS: tl.constexpr, PER_HEAD: tl.constexpr, REDUCE_MAX: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr):
    chunk = tl.program_id(0)
    hkv = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    r = tl.arange(0, ROWS)
    d = tl.arange(0, BLOCK_D)
    n = chunk * CHUNK + tl.arange(0, CHUNK)
    row_ok = r < GROUP
    d_ok = d < HEAD_DIM
    n_ok = n < n_k
    q = tl.load(Q + b * sqb + (hkv * GROUP + r[:, None]) * sqh + d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                other=0.0).to(tl.float32)
    m_t = tl.load(Means + b * smb + hkv * smh + n[None, :] * smn + d[:, None], mask=n_ok[None, :] & d_ok[:, None],
                  other=0.0).to(tl.float32)
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
def _select_kernel(Scores, Idx, Cnt, ssb, ssh, sib, sih, scb, n_k, top_k, sink_blocks, local_blocks, mass,
                   inv_root_d, WIDTH: tl.constexpr, USE_MASS: tl.constexpr, NK_POW2: tl.constexpr):
    h = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, NK_POW2)
    valid = cols < n_k
    raw = tl.load(Scores + b * ssb + h * ssh + cols, mask=valid, other=float("-inf"))
    logits = raw * inv_root_d
    top = reduce_max(logits, 0)
    total = top + tl.log(reduce_sum(tl.where(valid, tl.exp(logits - top), 0.0), 0))
    forced = valid & ((cols < sink_blocks) | (cols > n_k - 1 - local_blocks))
    acc = reduce_sum(tl.where(forced, tl.exp(logits - total), 0.0), 0)
    chosen = forced
    left = tl.where(forced | ~valid, float("-inf"), logits)
    for _ in range(0, top_k):
        best, at = tl.reduce((left, cols), 0, _first_max)
        take = best > float("-inf")
        if USE_MASS:
            take = take & (acc < mass)
        hit = tl.where(take, cols == at, False)
        chosen = chosen | hit
        acc += tl.where(take, tl.exp(best - total), 0.0)
        left = tl.where(cols == at, float("-inf"), left)
    ones = chosen.to(tl.int32)
    slot = tl.associative_scan(ones, 0, _add) - 1
    count = reduce_sum(ones, 0)
    tl.store(Idx + b * sib + h * sih + slot, cols, mask=chosen)
    w = tl.arange(0, WIDTH)
    tl.store(Idx + b * sib + h * sih + w, w * 0, mask=w >= count)
    tl.store(Cnt + b * scb + h, count)


def decode_block_topk_triton(q, k_means, *, top_k, sink_blocks, local_blocks, mass, per_head, reduce, width):
    B, Hq, D = q.shape
    Hkv, n_k = k_means.shape[1], k_means.shape[2]
    group = Hq // Hkv
    heads = Hq if per_head else Hkv
    scores = _alloc.empty((B, heads, n_k), torch.float32, q.device)
    block_d = max(16, triton.next_power_of_2(D))
    _scores_kernel[(triton.cdiv(n_k, SCORE_CHUNK), Hkv, B)](
        q, k_means, scores, q.stride(0), q.stride(1), *k_means.stride()[:3], scores.stride(0), scores.stride(1),
        n_k, GROUP=group, ROWS=max(16, triton.next_power_of_2(group)), PER_HEAD=per_head,
        REDUCE_MAX=reduce == "max", HEAD_DIM=D, BLOCK_D=block_d, CHUNK=SCORE_CHUNK)
    # The list buffer is padded to a power of two for the kernel's zero fill; callers see ``width`` entries.
    width_pow2 = triton.next_power_of_2(width)
    idx = _alloc.empty((B, heads, 1, width_pow2), torch.int32, q.device)
    counts = _alloc.empty((B, heads, 1), torch.int32, q.device)
    nk_pow2 = max(16, triton.next_power_of_2(n_k))
    _select_kernel[(heads, B)](
        scores, idx, counts, scores.stride(0), scores.stride(1), idx.stride(0), idx.stride(1), counts.stride(0),
        n_k, min(top_k, n_k), sink_blocks, local_blocks, float(mass), D ** -0.5, WIDTH=width_pow2,
        USE_MASS=mass < 1.0, NK_POW2=nk_pow2, num_warps=4 if nk_pow2 <= 4096 else 8)
    return idx[..., :width], counts
