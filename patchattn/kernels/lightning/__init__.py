"""Lightning Attention-2: causal linear attention with per-head exponential decay, tiled (intra-block quadratic +
inter-block recurrent state).

Entry point :func:`lightning_attention` (``backend``: ``torch`` = the chunked pure-torch path, ``triton`` = the
Triton forward of :mod:`.triton_fwd`, imported lazily so ``TRITON_INTERPRET`` can be set first; ``auto`` = Triton on
CUDA / under the interpreter).  The Triton path has no backward kernel of its own: its backward recomputes the block
through the chunked torch path and differentiates that (same maths, more memory).  Oracles: :mod:`.reference`.

This package imports only torch (and triton, lazily) plus its own modules.
"""
from __future__ import annotations

import math
import os

import torch

from .reference import chunked_linear_attention, naive_linear_attention, recurrent_step

__all__ = ["lightning_attention", "chunked_linear_attention", "naive_linear_attention", "recurrent_step",
           "alibi_slopes", "BACKENDS"]

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
    """Triton forward; backward through the chunked torch path (recomputed)."""

    @staticmethod
    def forward(ctx, q, k, v, slopes, state, block):
        from .triton_fwd import lightning_forward

        ctx.save_for_backward(q, k, v, slopes, state if state is not None else torch.empty(0))
        ctx.has_state, ctx.block = state is not None, block
        return lightning_forward(q, k, v, slopes, state, block)

    @staticmethod
    def backward(ctx, grad_out, grad_state):
        q, k, v, slopes, state = ctx.saved_tensors
        state = state if ctx.has_state else None
        with torch.enable_grad():
            inputs = [x.detach().requires_grad_(True) for x in (q, k, v)]
            s0 = state.detach().requires_grad_(True) if state is not None else None
            out, final = chunked_linear_attention(*inputs, slopes, s0, ctx.block)
            wanted = inputs + ([s0] if s0 is not None else [])
            grads = torch.autograd.grad((out, final), wanted, (grad_out, grad_state), allow_unused=True)
        gq, gk, gv = grads[:3]
        gs = grads[3] if s0 is not None else None
        return gq, gk, gv, None, gs, None


def lightning_attention(q, k, v, slopes, state=None, *, block: int = 64, backend: str = "auto"):
    """Decayed causal linear attention: ``(o [B, H, T, E], final state [B, H, F, E] float32)``.

    ``q, k [B, H, T, F]`` (already feature-mapped, same head count as ``v [B, H, T, E]``), ``slopes [H]`` (decay
    ``exp(-slope)`` per step), ``state`` the recurrent state after the previous tokens (None: zeros)."""
    if q.shape != k.shape or q.shape[:3] != v.shape[:3]:
        raise ValueError(f"lightning_attention: q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must "
                         "share [B, H, T] (and q, k their feature size)")
    if slopes.shape != (q.shape[1],):
        raise ValueError(f"lightning_attention: slopes must be [H] = [{q.shape[1]}], got {tuple(slopes.shape)}")
    if q.shape[2] == 0:
        s = state.float() if state is not None else q.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1],
                                                                  dtype=torch.float32)
        return v[:, :, :0], s
    if _use_triton(backend, q):
        return _TritonLightning.apply(q, k, v, slopes, state, block)
    return chunked_linear_attention(q, k, v, slopes, state, block)
