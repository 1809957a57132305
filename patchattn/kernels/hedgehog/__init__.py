"""The hedgehog feature map (LoLCATs) of the lightning layer: ``phi(x) = [softmax(x W_h), softmax(-x W_h)]``.

Entry point :func:`hedgehog_features` (``backend``: ``torch`` = :mod:`.reference`, ``triton`` = the fused forward
of :mod:`.triton_fwd`, imported lazily so ``TRITON_INTERPRET`` can be set first; ``auto`` = Triton on CUDA / under
the interpreter when no gradient is needed, the block-sparse engine's rule).  The Triton path has no backward: a call that needs gradients (the
weight is trained by the recipes) takes the torch path, whatever ``backend`` says.

This package imports only torch (and triton, lazily), its own modules and the block-sparse kernel's core-op
reductions.
"""
from __future__ import annotations

import torch

from ..blocksparse import _resolve_backend
from .reference import hedgehog_reference

__all__ = ["hedgehog_features", "hedgehog_reference"]


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def hedgehog_features(x: torch.Tensor, weight: torch.Tensor, *, backend: str = "auto",
                      out_dtype=torch.float32) -> torch.Tensor:
    """``[B, H, T, 2D]`` features of ``x [B, H, T, D]`` under ``weight [H, D, D]``, in ``out_dtype``."""
    if x.dim() != 4 or weight.shape != (x.shape[1], x.shape[3], x.shape[3]):
        raise ValueError(f"hedgehog_features: x must be [B, H, T, D] and weight [H, D, D]; got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"hedgehog_features: backend must be one of ('auto', 'triton', 'torch'), got {backend!r}")
    # the engine's rule for the fused path: CUDA or the interpreter, Triton dtypes
    if _needs_grad(x, weight) or x.shape[2] == 0 or _resolve_backend(backend, x) != "triton":
        return hedgehog_reference(x, weight).to(out_dtype)
    from .triton_fwd import hedgehog_forward

    return hedgehog_forward(x, weight, out_dtype)
