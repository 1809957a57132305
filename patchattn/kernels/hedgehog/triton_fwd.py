"""Triton forward of the hedgehog feature map: one program per (batch x head, block of rows) projects its rows by
the head's ``D x D`` matrix and writes both softmaxes, in one pass over ``x`` (the torch path makes a float32
projection, two float32 softmaxes, their concatenation and a cast: five passes over ``[T, 2D]``-sized tensors)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# core-op reductions: triton's own tl.max / tl.sum break under the interpreter when triton was imported first
from ..blocksparse.triton_fwd import reduce_max, reduce_sum


@triton.jit
def _hedgehog_fwd(X, W, OUT, T, H, D: tl.constexpr, BD: tl.constexpr, BLOCK: tl.constexpr, IEEE: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_t = tl.program_id(1)
    head = pid_bh % H
    rows = pid_t * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, BD)
    r_ok = rows < T
    c_ok = cols < D
    x = tl.load(X + pid_bh * T * D + rows[:, None] * D + cols[None, :], mask=r_ok[:, None] & c_ok[None, :],
                other=0.0).to(tl.float32)
    w = tl.load(W + head * D * D + cols[:, None] * D + cols[None, :], mask=c_ok[:, None] & c_ok[None, :],
                other=0.0).to(tl.float32)
    # float32 models: float32 products (the reference's precision); 16-bit ones: tf32 on tensor cores (x is exact
    # in tf32, the weight rounds to 10 mantissa bits, finer than the 16-bit model's own projections)
    if IEEE:
        proj = tl.dot(x, w, input_precision="ieee")
    else:
        proj = tl.dot(x, w, input_precision="tf32")
    plus = tl.where(c_ok[None, :], proj, float("-inf"))
    minus = tl.where(c_ok[None, :], -proj, float("-inf"))
    plus = tl.exp(plus - reduce_max(plus, 1)[:, None])
    minus = tl.exp(minus - reduce_max(minus, 1)[:, None])
    plus = plus / reduce_sum(plus, 1)[:, None]
    minus = minus / reduce_sum(minus, 1)[:, None]
    base = OUT + pid_bh * T * 2 * D + rows[:, None] * 2 * D + cols[None, :]
    mask = r_ok[:, None] & c_ok[None, :]
    tl.store(base, plus.to(OUT.dtype.element_ty), mask=mask)
    tl.store(base + D, minus.to(OUT.dtype.element_ty), mask=mask)


def hedgehog_forward(x: torch.Tensor, weight: torch.Tensor, out_dtype=None, block: int = 64) -> torch.Tensor:
    """``[B, H, T, 2D]`` in ``out_dtype`` (default x's dtype); see :mod:`.reference`."""
    batch, heads, t, d = x.shape
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty(batch, heads, t, 2 * d, device=x.device, dtype=out_dtype or x.dtype)
    grid = (batch * heads, triton.cdiv(t, block))
    _hedgehog_fwd[grid](x, weight, out, t, heads, D=d, BD=max(16, triton.next_power_of_2(d)), BLOCK=block,
                        IEEE=x.dtype == torch.float32 or not x.is_cuda)  # CPU: the interpreter (its 16-bit dot)
    return out
