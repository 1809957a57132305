"""Triton forward of landmark's grouped softmax (inference): one launch for the local blocks and every retrieved
block of every row.

One program = one (batch, q head, tile of ``BLOCK_M`` rows inside one query block of ``BLOCK`` rows, aligned on key
blocks).  Scores are in log2 units (exp2), as in the block-sparse engine, whose tile loads, matmul, reductions and
tanh are reused (:mod:`patchattn.kernels.blocksparse.triton_fwd`).  One running max ``m``, sum ``l`` and
accumulator ``acc`` per row, over *items*:

* local keys (blocks ``c - local + 1 .. c``, causal): item ``j`` has log-weight ``s_j`` and value ``v_j`` (a plain
  online softmax);
* entry ``r`` of the query block's list (block ``n``): log-weight ``g`` (the row's landmark logit where the row
  retrieved ``n``, ``-inf`` otherwise) and value ``o_n = sum_j softmax_j(s_nj) v_nj`` (the block's own softmax,
  complete in one tile: ``BLOCK_N = BLOCK``).  ``m' = max(m, g)``, ``acc = acc 2^(m - m') + (2^(g - m') / S_n)
  sum_j 2^(s_nj - max_j s_nj) v_nj``, ``l`` likewise.  A tile of part of a query block skips, before any load, the
  entries none of its rows retrieved; a whole-block tile has no branch in its loop (each entry is some row's pick).

``out = acc / l``.  A row's ``g`` for entry ``r``: sparse picks (``DENSE_GATES`` off) compare the row's pick entries,
held in registers (``[BLOCK_M, PICKS_P2]``), with ``r``; dense gates (many picks per row) load column ``r`` of a
``[rows, W]`` gate matrix.  Forward only.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..blocksparse import _alloc
from ..blocksparse.triton_fwd import (
    LOG2E,
    dot_precision,
    interpreter_tiles,
    last_dim_contiguous,
    launch,
    list_strides,
    mma,
    reduce_max,
    reduce_sum,
    tanh,
)
from . import SPARSE_PICKS_MAX

FEW_ROWS = 16  # decode-sized calls (Tq <= this) take 16-row tiles


@triton.jit
def _scores(q, k, scale_log2, scale_over_cap, cap_log2, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    qk = mma(q, tl.trans(k), None, DOT_PRECISION)
    if HAS_SOFTCAP:
        s = cap_log2 * tanh(qk * scale_over_cap)
    else:
        s = qk * scale_log2
    return s


@triton.jit
def _block_item(acc, m_i, l_i, g, q, entry_ptr, k_base, v_base, skt, svt, offs_n, offs_d, d_ok, scale_log2,
                scale_over_cap, cap_log2, BLOCK: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """One list entry as an item: the block's own softmax output, weighted by the rows' gates ``g`` (log2 units,
    ``-inf``: the row did not retrieve it) into the running (acc, m, l)."""
    cols = tl.load(entry_ptr).to(tl.int64) * BLOCK + offs_n  # a complete block: no key mask
    k = tl.load(k_base + cols[:, None] * skt + offs_d[None, :], mask=d_ok[None, :], other=0.0)
    s = _scores(q, k, scale_log2, scale_over_cap, cap_log2, HAS_SOFTCAP, DOT_PRECISION)
    p = tl.math.exp2(s - reduce_max(s, 1)[:, None])
    m_new = tl.maximum(m_i, g)  # m_i is finite: every row sees its own key
    alpha = tl.math.exp2(m_i - m_new)
    w = tl.math.exp2(g - m_new)  # 0 where the row did not retrieve the block
    v = tl.load(v_base + cols[:, None] * svt + offs_d[None, :], mask=d_ok[None, :], other=0.0)
    acc = mma((p * (w / reduce_sum(p, 1))[:, None]).to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION)
    return acc, m_new, l_i * alpha + w


@triton.jit
def _landmark_kernel(
        Q, K, V, Out, KvIdx, KvCnt, Entry, Gate, scale_log2, scale_over_cap, cap_log2,
        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
        sib, sih, siq, sik, scb, sch, scq, seb, seh, set_, sek, sgb, sgh, sgt, sgk,
        Hq, Tq, Tk, picks, local,
        GROUP: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        PICKS_P2: tl.constexpr, DENSE_GATES: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FEW: tl.constexpr,
        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_bh = tl.program_id(0)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    pad = (Tk - Tq) % BLOCK  # alignment rows in front of the first query (never computed, never stored)
    first_pos = Tk - Tq - pad  # key position of padded row 0 (a block start)
    tile = pad // BLOCK_M + tl.num_programs(1) - 1 - tl.program_id(1)  # late (wide) query blocks first
    prow = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # padded rows
    qrow = prow - pad
    row_ok = (qrow >= 0) & (qrow < Tq)
    pos = first_pos + prow
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK)
    q = tl.load(Q + b * sqb + h * sqh + qrow.to(tl.int64)[:, None] * sqt + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * skb + (h // GROUP) * skh
    v_base = V + b * svb + (h // GROUP) * svh
    m_blk = (tile * BLOCK_M) // BLOCK
    current = first_pos // BLOCK + m_blk

    # Local keys: a plain causal online softmax (log2 units).
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    lo = tl.maximum(current - local + 1, 0) * BLOCK
    hi = tl.minimum(first_pos + tile * BLOCK_M + BLOCK_M, Tk)  # one past the tile's last causal key
    for start in range(lo, hi, BLOCK):
        cols = start + offs_n
        col_ok = cols < Tk
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols.to(tl.int64)[:, None] * skt + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _scores(q, k, scale_log2, scale_over_cap, cap_log2, HAS_SOFTCAP, DOT_PRECISION)
        s = tl.where(col_ok[None, :] & (cols[None, :] <= pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, reduce_max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + reduce_sum(p, 1)
        v = tl.load(v_base + cols.to(tl.int64)[:, None] * svt + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION)
        m_i = m_new

    # Retrieved blocks: one item per list entry, weighted by the row's gate.
    list_ptr = KvIdx + b * sib + h * sih + m_blk * siq
    count = tl.load(KvCnt + b * scb + h * sch + m_blk * scq)
    gate_rows = Gate + b * sgb + h * sgh + qrow.to(tl.int64) * sgt
    if not DENSE_GATES:
        offs_p = tl.arange(0, PICKS_P2)
        p_mask = row_ok[:, None] & (offs_p < picks)[None, :]
        ent = tl.load(Entry + b * seb + h * seh + qrow.to(tl.int64)[:, None] * set_ + offs_p[None, :] * sek,
                      mask=p_mask, other=-1).to(tl.int32)
        gat = tl.load(gate_rows[:, None] + offs_p[None, :] * sgk, mask=p_mask, other=float("-inf"))
        gat = gat.to(tl.float32) * 1.4426950408889634
    for r in range(count):
        if DENSE_GATES:
            g = tl.load(gate_rows + r * sgk, mask=row_ok, other=float("-inf")).to(tl.float32) * 1.4426950408889634
        else:
            g = reduce_max(tl.where(ent == r, gat, float("-inf")), 1)
        if BLOCK_M < BLOCK:  # a tile of part of the query block: skip the entries none of its rows retrieved
            if reduce_max(g, 0) > float("-inf"):
                acc, m_i, l_i = _block_item(acc, m_i, l_i, g, q, list_ptr + r * sik, k_base, v_base, skt, svt,
                                            offs_n, offs_d, d_ok, scale_log2, scale_over_cap, cap_log2, BLOCK,
                                            HAS_SOFTCAP, DOT_PRECISION)
        else:  # the whole query block: every entry is some row's pick (no branch in the loop)
            acc, m_i, l_i = _block_item(acc, m_i, l_i, g, q, list_ptr + r * sik, k_base, v_base, skt, svt, offs_n,
                                        offs_d, d_ok, scale_log2, scale_over_cap, cap_log2, BLOCK, HAS_SOFTCAP,
                                        DOT_PRECISION)

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_ptrs = Out + b * sob + h * soh + qrow.to(tl.int64)[:, None] * sot + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _configs():
    """Row tiles (``BLOCK_M``, inside one query block) x warps x stages; key tiles are whole blocks."""
    shapes = [(64, 4, 2), (64, 4, 3), (64, 8, 2), (32, 4, 2), (32, 4, 3), (128, 8, 2), (128, 8, 3), (16, 4, 2),
              (16, 4, 3)]
    return [triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=s) for m, w, s in shapes]


def prune_configs(configs, named_args, **kwargs):
    """Tiles inside the query block, smaller at head_dim 256; 16 rows for decode-sized calls.  Prefill keeps 16-row
    tiles among the candidates: they skip the list entries none of their rows retrieved, which matters when a query
    block's rows retrieve different blocks."""
    block, few, d = kwargs["BLOCK"], kwargs["FEW"], kwargs["BLOCK_D"]
    fits = [c for c in configs if c.kwargs["BLOCK_M"] <= block
            and (d <= 128 or c.kwargs["BLOCK_M"] * block <= 64 * 64)]
    few_fits = [c for c in fits if c.kwargs["BLOCK_M"] == FEW_ROWS] if few else []
    return few_fits or fits or configs[-1:]


_landmark_tuned = triton.autotune(
    configs=_configs(), key=["HEAD_DIM", "BLOCK", "GROUP", "PICKS_P2", "DENSE_GATES", "HAS_SOFTCAP", "FEW"],
    prune_configs_by={"early_config_prune": prune_configs})(_landmark_kernel)


def dense_gates(pick_entry, pick_gate, width: int) -> torch.Tensor:
    """fp32 ``[B, Hq, Tq, width]``: each row's gate at its picks' entries, ``-inf`` elsewhere."""
    batch, heads, rows, _ = pick_entry.shape
    gates = torch.full((batch, heads, rows, width + 1), float("-inf"), dtype=torch.float32, device=pick_gate.device)
    slot = torch.where(pick_entry >= 0, pick_entry.long(), width)  # not a candidate: the dropped last column
    return gates.scatter_(-1, slot, pick_gate.float())[..., :width]


def forward(q, k, v, kv_indices, kv_counts, pick_entry, pick_gate, block: int, local_blocks: int, scale: float,
            softcap: float | None, options):
    """Launch the kernel: ``out [B, Hq, Tq, D]`` in q's dtype, viewed from a ``[B, Tq, Hq, D]`` buffer."""
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    batch, heads, q_len, dim = q.shape
    kv_len = k.shape[2]
    pad = (kv_len - q_len) % block
    picks = pick_entry.shape[-1]
    dense = picks > SPARSE_PICKS_MAX
    if dense:
        pick_gate = dense_gates(pick_entry, pick_gate, kv_indices.shape[-1])
        pick_entry = kv_counts  # never read
    out = _alloc.empty((batch, q_len, heads, dim), q.dtype, q.device, options.poison_outputs).transpose(1, 2)
    entry_s = list_strides(pick_entry) if not dense else (0, 0, 0, 0)
    args = (q, k, v, out, kv_indices, kv_counts, pick_entry, pick_gate,
            scale * LOG2E, scale / softcap if softcap else 0.0, softcap * LOG2E if softcap else 0.0,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            *list_strides(kv_indices), *list_strides(kv_counts), *entry_s, *list_strides(pick_gate),
            heads, q_len, kv_len, picks, local_blocks)
    few = q_len <= FEW_ROWS
    consts = {"GROUP": heads // k.shape[1], "BLOCK": block, "HEAD_DIM": dim, "BLOCK_D": max(16, triton.next_power_of_2(dim)),
                  "PICKS_P2": max(2, triton.next_power_of_2(max(picks, 1))) if not dense else 2, "DENSE_GATES": dense,
                  "HAS_SOFTCAP": softcap is not None, "FEW": few, "DOT_PRECISION": dot_precision(q.dtype)}
    bm = interpreter_tiles(FEW_ROWS if few and block >= FEW_ROWS else block, block, options)[0]

    def grid(meta):
        return (batch * heads, triton.cdiv(q_len + pad, meta["BLOCK_M"]) - pad // meta["BLOCK_M"])

    launch(_landmark_tuned, grid, args, consts, {"BLOCK_M": bm}, q.device, options.autotune)
    return out
