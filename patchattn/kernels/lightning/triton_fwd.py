"""Triton forward of Lightning Attention-2: one program per (batch x head, value-column chunk) walks the sequence
block by block, keeping the ``[F, E_chunk]`` state in float32 registers (intra-block: masked decayed ``(Q K^T) V``;
inter-block: ``lambda^(row+1) Q S``; then ``S <- lambda^c S + (K lambda^(c-1-row))^T V``).  Same definition as
:mod:`.reference` (its chunked path is the oracle)."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# core-op reductions: triton's own tl.sum breaks under the interpreter when triton was imported first
from ..blocksparse.triton_fwd import reduce_sum

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _mm(a, b, UPCAST: tl.constexpr):
    """a @ b in float32: float32 products when UPCAST (float32 inputs: the oracle's precision; the CPU interpreter,
    whose 16-bit dot is wrong), else the inputs' own dtype on tensor cores."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _lightning_fwd(Q, K, V, S_IN, O, S_OUT, SLOPES, T, H,
                   F: tl.constexpr, E: tl.constexpr, BLOCK: tl.constexpr, BF: tl.constexpr, BE: tl.constexpr,
                   GROUPS: tl.constexpr, HAS_STATE: tl.constexpr, UPCAST: tl.constexpr, NORMALIZED: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_e = tl.program_id(1)
    head = pid_bh % H
    kv_head = (pid_bh // H) * (H // GROUPS) + head // GROUPS  # GQA: query heads share a key/value head
    slope = tl.load(SLOPES + head).to(tl.float32)
    offs_b = tl.arange(0, BLOCK)
    offs_f = tl.arange(0, BF)
    offs_e = pid_e * BE + tl.arange(0, BE)
    # NORMALIZED: V's last column is the denominator's (ones on real keys); each program divides its own output
    # columns by it, carrying the denominator's state column z [F] beside its chunk of the state
    EO: tl.constexpr = E - 1 if NORMALIZED else E
    f_ok = offs_f < F
    e_ok = offs_e < EO
    q_base = Q + pid_bh * T * F
    k_base = K + kv_head * T * F
    v_base = V + kv_head * T * E
    o_base = O + pid_bh * T * EO
    s_off = pid_bh * F * E + offs_f[:, None] * E + offs_e[None, :]
    s_mask = f_ok[:, None] & e_ok[None, :]
    z_off = pid_bh * F * E + offs_f * E + (E - 1)
    if HAS_STATE:
        state = tl.load(S_IN + s_off, mask=s_mask, other=0.0).to(tl.float32)
    else:
        state = tl.full([BF, BE], 0.0, dtype=tl.float32)
    z = tl.full([BF], 0.0, dtype=tl.float32)
    if HAS_STATE and NORMALIZED:
        z = tl.load(S_IN + z_off, mask=f_ok, other=0.0).to(tl.float32)
    diff = offs_b[:, None] - offs_b[None, :]
    intra = tl.where(diff >= 0, tl.exp(-slope * tl.maximum(diff, 0).to(tl.float32)), 0.0)
    q_decay = tl.exp(-slope * (offs_b + 1).to(tl.float32))
    for start in range(0, T, BLOCK):
        rows = start + offs_b
        r_ok = rows < T
        q = tl.load(q_base + rows[:, None] * F + offs_f[None, :], mask=r_ok[:, None] & f_ok[None, :], other=0.0)
        k = tl.load(k_base + rows[:, None] * F + offs_f[None, :], mask=r_ok[:, None] & f_ok[None, :], other=0.0)
        v = tl.load(v_base + rows[:, None] * E + offs_e[None, :], mask=r_ok[:, None] & e_ok[None, :], other=0.0)
        c = tl.minimum(T - start, BLOCK)
        k_decay = tl.where(r_ok, tl.exp(-slope * tl.maximum(c - 1 - offs_b, 0).to(tl.float32)), 0.0)
        # 16-bit inputs: float32 scores / state / decayed keys are rounded to the input dtype for the next product
        # (as FlashAttention rounds P) so the products run on tensor cores; accumulation and state stay float32.
        scores = _mm(q, tl.trans(k), UPCAST) * intra
        out = _mm(scores.to(v.dtype), v, UPCAST)
        out += _mm(q, state.to(q.dtype), UPCAST) * q_decay[:, None]
        update = _mm(tl.trans((k * k_decay[:, None]).to(v.dtype)), v, UPCAST)
        decay_c = tl.exp(-slope * c.to(tl.float32))
        if NORMALIZED:  # the denominator in float32: decayed scores times the key weights + q . z
            w = tl.load(v_base + rows * E + (E - 1), mask=r_ok, other=0.0).to(tl.float32)
            den = reduce_sum(scores * w[None, :], 1) + reduce_sum(q.to(tl.float32) * z[None, :], 1) * q_decay
            out = tl.where(den[:, None] > 1e-12, out / tl.maximum(den, 1e-12)[:, None], 0.0)
            z = z * decay_c + reduce_sum(k.to(tl.float32) * (k_decay * w)[:, None], 0)
        tl.store(o_base + rows[:, None] * EO + offs_e[None, :], out.to(O.dtype.element_ty),
                 mask=r_ok[:, None] & e_ok[None, :])
        state = state * decay_c + update
    tl.store(S_OUT + s_off, state, mask=s_mask)
    if NORMALIZED:  # noqa: SIM102 (a compile-time branch around a run-time one)
        if pid_e == 0:
            tl.store(S_OUT + z_off, z, mask=f_ok)


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def pipeline_stages(features: int) -> int:
    """Software-pipelining stages: triton's default 3 for head dims up to 128; 1 for wider feature maps (the
    lightning layer's hedgehog features, 256 per head: three stages of its q/k tiles asked for 368 KB of shared
    memory on an H100, which has 227 KB; bench/linear/lightning_h100_failed.csv)."""
    return 3 if _pow2(features) <= 128 else 1


def lightning_forward(q, k, v, slopes, state=None, block: int = 64, out_dtype=None, *, normalized: bool = False,
                      block_e: int | None = None, num_warps: int | None = None, num_stages: int | None = None):
    """``(o [B, H, T, E] in ``out_dtype`` (default v's dtype), final state [B, H, F, E] float32)``; see
    :mod:`.reference`.  ``k`` / ``v`` may have fewer heads than ``q`` (GQA: ``H`` a multiple of theirs), read in
    place.  ``normalized``: v's last column is a denominator's (see ``lightning_attention(normalize_last=)``); the
    output has ``E - 1`` columns, each divided by it, the state all ``E``.  ``block_e`` (value columns per program, default up to 64), ``num_warps`` and ``num_stages``
    override the launch configuration (``bench/linear/lightning_sweep.py`` times them)."""
    batch, heads, t, f = q.shape
    e = v.shape[-1]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    e_out = e - 1 if normalized else e
    out = torch.empty(batch, heads, t, e_out, device=q.device, dtype=out_dtype or v.dtype)
    final = torch.empty(batch, heads, f, e, device=q.device, dtype=torch.float32)
    block_e = block_e or min(_pow2(e_out), 64)
    s_in = state.float().contiguous() if state is not None else final
    grid = (batch * heads, triton.cdiv(e_out, block_e))
    launch = {"num_stages": num_stages or pipeline_stages(f)}
    if num_warps:
        launch["num_warps"] = num_warps
    _lightning_fwd[grid](q, k, v, s_in, out, final, slopes.float().contiguous(), t, heads,
                         F=f, E=e, BLOCK=max(16, block), BF=_pow2(f), BE=block_e, GROUPS=heads // k.shape[1],
                         HAS_STATE=state is not None, NORMALIZED=normalized,
                         UPCAST=q.dtype == torch.float32 or INTERPRETING, **launch)
    return out, final
