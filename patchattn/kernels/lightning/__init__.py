"""Lightning Attention-2: causal linear attention with per-head exponential decay, tiled (intra-block quadratic +
inter-block recurrent state).

Entry point :func:`lightning_attention` (``backend``: ``torch`` = the chunked pure-torch path, ``triton`` = the
Triton forward of :mod:`.triton_fwd`, imported lazily so ``TRITON_INTERPRET`` can be set first; ``auto`` = Triton on
CUDA / under the interpreter).  The Triton backward is three more runs of the forward kernel (dQ forward in time,
dK and dV on the reversed sequence) plus O(T F E) torch terms for the states.  Oracles: :mod:`.reference`.

This package imports only torch (and triton, lazily) plus its own modules.
"""
from __future__ import annotations

import math
import os

import torch

from .reference import chunked_linear_attention, naive_linear_attention, recurrent_step

__all__ = [
    "BACKENDS",
    "alibi_slopes",
    "chunked_linear_attention",
    "divide_by_last",
    "lightning_attention",
    "naive_linear_attention",
    "recurrent_step",
]

BACKENDS = ("auto", "triton", "torch")


def alibi_slopes(heads: int) -> list[float]:
    """The geometric ALiBi slopes Lightning/TransNormerLLM use (``_build_slope_tensor``), one per head."""
    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(heads).is_integer():
        return power_of_2(heads)
    closest = 2 ** math.floor(math.log2(heads))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][: heads - closest]


def _use_triton(backend: str, q: torch.Tensor) -> bool:
    if backend == "torch":
        return False
    if backend == "triton":
        return True
    if backend != "auto":
        raise ValueError(f"lightning_attention: backend must be one of {BACKENDS}, got {backend!r}")
    return q.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


class _TritonLightning(torch.autograd.Function):
    """Triton forward; Triton backward from three more runs of the forward kernel (see :func:`_triton_backward`)."""

    @staticmethod
    def forward(ctx, q, k, v, slopes, state, block, out_dtype):
        from .triton_fwd import lightning_forward

        ctx.save_for_backward(q, k, v, slopes, state if state is not None else torch.empty(0))
        ctx.has_state, ctx.block = state is not None, block
        return lightning_forward(q, k, v, slopes, state, block, out_dtype)

    @staticmethod
    def backward(ctx, grad_out, grad_state):
        q, k, v, slopes, state = ctx.saved_tensors
        state = state if ctx.has_state else None
        groups = q.shape[1] // k.shape[1]  # GQA: the backward runs on repeated heads, then sums each group
        gq, gk, gv, gs = _triton_backward(q, _repeat_heads(k, groups), _repeat_heads(v, groups), slopes, state,
                                          grad_out, grad_state, ctx.block)
        gk, gv = (_sum_groups(g, groups) for g in (gk, gv))
        return gq.to(q.dtype), gk.to(k.dtype), gv.to(v.dtype), None, gs, None, None


def _repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _sum_groups(grad: torch.Tensor, groups: int) -> torch.Tensor:
    return grad if groups == 1 else grad.unflatten(1, (-1, groups)).sum(2)


def _triton_backward(q, k, v, slopes, state, grad_out, grad_state, block):
    """Gradients of ``(o, final state)``; each sum over tokens is itself a decayed linear attention:

    * ``dQ_t = sum_{j<=t} lambda^(t-j) (dO_t . v_j) k_j + lambda^(t+1) dO_t S_0^T`` -- the forward with
      ``(q, k, v, S_0) -> (dO, V, K, S_0^T)``;
    * ``dK_j = sum_{t>=j} lambda^(t-j) (dO_t . v_j) q_t`` and ``dV_j = sum_{t>=j} lambda^(t-j) (q_t . k_j) dO_t``
      -- the forward on the reversed sequence with ``(V, dO, Q)`` and ``(K, Q, dO)``;
    * the final state ``S_T = lambda^T S_0 + sum_j lambda^(T-1-j) k_j^T v_j`` adds ``lambda^(T-1-j) G v_j`` to
      ``dK_j``, ``lambda^(T-1-j) G^T k_j`` to ``dV_j`` (``G``: its gradient) and ``dS_0 = sum_t lambda^(t+1)
      q_t^T dO_t + lambda^T G`` (these three in torch, O(T F E))."""
    from .triton_fwd import lightning_forward

    t = q.shape[2]
    d_out = grad_out.to(v.dtype)
    flip = lambda x: x.flip(2)
    init = state.float().transpose(-1, -2).contiguous() if state is not None else None
    gq, _ = lightning_forward(d_out, v, k, slopes, init, block)
    gk, _ = lightning_forward(flip(v), flip(d_out), flip(q), slopes, None, block)
    gv, _ = lightning_forward(flip(k), flip(q), flip(d_out), slopes, None, block)
    gq, gk, gv = gq.float(), flip(gk).float(), flip(gv).float()
    pos = torch.arange(t, device=q.device)
    lam = lambda n: torch.exp(-slopes.float()[:, None] * n.float())  # [H, len(n)]: lambda^n
    grad_state = grad_state.float() if grad_state is not None else None
    if grad_state is not None:
        tail = lam(t - 1 - pos)[None, :, :, None]  # lambda^(T-1-j)
        gk = gk + tail * (v.float() @ grad_state.transpose(-1, -2))
        gv = gv + tail * (k.float() @ grad_state)
    gs = None
    if state is not None:
        gs = torch.einsum("bhtf,bhte->bhfe", q.float() * lam(pos + 1)[None, :, :, None], grad_out.float())
        if grad_state is not None:
            gs = gs + lam(torch.tensor([t], device=q.device))[None, :, :, None] * grad_state
    return gq, gk, gv, gs


def divide_by_last(out: torch.Tensor) -> torch.Tensor:
    """``out[..., :-1] / out[..., -1:]`` in float32 where the denominator exceeds 1e-12, else 0 (a row that saw no
    real key)."""
    num, den = out[..., :-1].float(), out[..., -1:].float()
    return torch.where(den > 1e-12, num / den.clamp_min(1e-12), torch.zeros_like(num))


def lightning_attention(q, k, v, slopes, state=None, *, block: int = 64, backend: str = "auto", out_dtype=None,
                        normalize_last: bool = False):
    """Decayed causal linear attention: ``(o [B, H, T, E], final state [B, H, F, E] float32)``.

    ``q [B, H, T, F]``, ``k [B, Hkv, T, F]`` (already feature-mapped; ``Hkv`` divides ``H``: GQA, read in place by
    the Triton path), ``v [B, Hkv, T, E]``, ``slopes [H]`` (decay
    ``exp(-slope)`` per step), ``state`` the recurrent state after the previous tokens (None: zeros).  Products run
    in the inputs' dtype (16-bit: tensor cores, float32 accumulation), sums and the state in float32; ``o`` is
    returned in ``out_dtype`` (default v's dtype).  ``normalize_last``: v's last column weighs each key in a
    denominator (ones on real keys); the output is the other columns divided by it (:func:`divide_by_last`), ``E - 1``
    columns; the Triton forward does it in the kernel when no gradient is needed, and the state keeps all ``E``."""
    if (q.shape[0], q.shape[2:]) != (k.shape[0], k.shape[2:]) or k.shape[:3] != v.shape[:3] \
            or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"lightning_attention: q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must "
                         "share [B, T] (q, k their feature size; k, v their heads, which divide q's: GQA)")
    if slopes.shape != (q.shape[1],):
        raise ValueError(f"lightning_attention: slopes must be [H] = [{q.shape[1]}], got {tuple(slopes.shape)}")
    if normalize_last and v.shape[-1] < 2:
        raise ValueError(f"lightning_attention: normalize_last needs v with a value column and the denominator's, "
                         f"got {v.shape[-1]} column(s)")
    if q.shape[2] == 0:
        s = state.float() if state is not None else q.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1],
                                                                  dtype=torch.float32)
        return v.new_zeros(*q.shape[:3], v.shape[-1] - normalize_last, dtype=out_dtype or v.dtype), s
    triton_path = _use_triton(backend, q)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, state))
    if triton_path and normalize_last and not needs_grad:
        from .triton_fwd import lightning_forward

        return lightning_forward(q, k, v, slopes, state, block, out_dtype, normalized=True)
    inner_dtype = torch.float32 if normalize_last else out_dtype
    if triton_path:
        out, final = _TritonLightning.apply(q, k, v, slopes, state, block, inner_dtype)
    else:
        groups = q.shape[1] // k.shape[1]
        out, final = chunked_linear_attention(q, _repeat_heads(k, groups), _repeat_heads(v, groups), slopes, state,
                                              block, inner_dtype)
    if normalize_last:
        out = divide_by_last(out).to(out_dtype or v.dtype)
    return out, final
