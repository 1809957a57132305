"""Received attention: for every query head, the mean over the query rows of the softmax attention each key
receives, ``received[b, h, j] = (1 / Tq) sum_i softmax_j(scale q_i . k_j)`` -- the column means of the attention
matrix, without the matrix.

Entry point :func:`received_attention`.  Bidirectional (every query sees every key, as in a vision tower).  ``paint``
scores a CLS-less vision tower's patches with it (``patchattn/methods/paint.py``).  Backends: ``torch``
(:mod:`.reference`, chunked over query rows: the CPU path, float64, and any mask) and ``triton`` (:mod:`.triton_fwd`,
two passes, imported lazily so ``TRITON_INTERPRET`` can be set first).  Forward only: the output carries no
gradient.  Launch options: ``options=`` (:class:`patchattn.kernels.KernelOptions`) or the scoped
:func:`patchattn.kernels.kernel_options`.
"""
from __future__ import annotations

import torch

from ..blocksparse import BACKENDS, TRITON_DTYPES, _resolve_backend
from ..options import KernelOptions, resolve_options
from .reference import DEFAULT_CHUNK_ROWS, received_attention_torch

__all__ = ["BACKENDS", "received_attention"]

MAX_TRITON_HEAD_DIM = 256


def received_attention(q, k, *, scale: float | None = None, mask=None, backend: str = "auto",
                       chunk_rows: int = DEFAULT_CHUNK_ROWS, options: KernelOptions | None = None) -> torch.Tensor:
    """``[B, Hq, Tk]``: the mean over the ``Tq`` query rows of the softmax probability of each key (see the module
    docstring); float32 (float64 for float64 inputs on the torch path).

    q ``[B, Hq, Tq, D]``, k ``[B, Hkv, Tk, D]`` (``Hq % Hkv == 0``: GQA/MQA read k in place).  ``scale`` defaults to
    ``1/sqrt(D)``.  ``mask``: None, or bool (False: hidden) / additive, broadcastable to ``[B, Hq, Tq, Tk]`` (torch
    path; a row that sees no key adds 0).  ``backend``: "auto" (Triton on CUDA or under ``TRITON_INTERPRET=1`` for
    fp16/bf16/fp32, head dims up to 256 and no mask, else torch), "triton", "torch".  ``chunk_rows``: query rows
    per chunk on the torch path (memory ``chunk_rows x Tk`` scores per head).
    """
    backend = _validate(q, k, mask, backend, chunk_rows)
    scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    q, k = q.detach(), k.detach()
    if q.shape[2] == 0 or k.shape[2] == 0:
        return q.new_zeros(q.shape[0], q.shape[1], k.shape[2], dtype=_compute_dtype(q))
    if backend == "torch":
        return received_attention_torch(q, k, scale=scale, mask=mask, chunk_rows=chunk_rows)
    from . import triton_fwd

    return triton_fwd.forward(q, k, scale, resolve_options(options))


def _compute_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _validate(q, k, mask, requested, chunk_rows) -> str:
    """Shapes, dtypes and devices; returns the backend that runs ("triton" or "torch")."""
    where = "received_attention"
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{where}: q and k must be 4-D [B, H, T, D]; got {tuple(q.shape)}, {tuple(k.shape)}")
    B, Hq, Tq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"{where}: k must be [B={B}, Hkv, Tk, D={D}]; got {tuple(k.shape)}")
    if k.shape[1] == 0 or Hq % k.shape[1]:
        raise ValueError(f"{where}: query heads ({Hq}) must be a multiple of key heads ({k.shape[1]})")
    if not (q.is_floating_point() and q.dtype == k.dtype):
        raise ValueError(f"{where}: q and k must share one floating dtype; got {q.dtype}, {k.dtype}")
    if k.device != q.device or (mask is not None and mask.device != q.device):
        raise ValueError(f"{where}: q, k and the mask must be on one device")
    if mask is not None:
        try:
            torch.broadcast_shapes(mask.shape, (B, Hq, Tq, k.shape[2]))
        except RuntimeError:
            raise ValueError(f"{where}: the mask {tuple(mask.shape)} does not broadcast to [B, Hq, Tq, Tk] = "
                             f"{(B, Hq, Tq, k.shape[2])}") from None
    if chunk_rows < 1:
        raise ValueError(f"{where}: chunk_rows must be >= 1, got {chunk_rows}")
    backend = _resolve_backend(requested, q)  # the engine's rule: Triton on CUDA or under the interpreter
    if backend == "triton" and not (q.dtype in TRITON_DTYPES and D <= MAX_TRITON_HEAD_DIM and mask is None):
        if requested == "triton":
            raise ValueError(f"{where}: the Triton kernel takes fp16, bf16 or fp32 inputs with head dims up to "
                             f"{MAX_TRITON_HEAD_DIM} and no mask; got {q.dtype}, head dim {D}, mask "
                             f"{'given' if mask is not None else 'None'} (backend='torch' takes any)")
        backend = "torch"
    return backend
