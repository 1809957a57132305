"""Received attention: for every query head, the mean over the query rows of the softmax attention each key
receives, ``received[b, h, j] = (1 / Tq) sum_i softmax_j(scale q_i . k_j)`` -- the column means of the attention
matrix, without the matrix.

Entry points :func:`received_attention` and :func:`received_causal` (the causal column scores ``act`` finds its
sinks with, from a given log-sum-exp).  Bidirectional (every query sees every key, as in a vision tower).  ``paint``
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
from .reference import DEFAULT_CHUNK_ROWS, received_attention_torch, received_causal_torch

__all__ = ["BACKENDS", "received_attention", "received_causal"]

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


def received_causal(q, k, lse, *, scale: float | None = None, starts=None, ends=None, columns: bool = True,
                    backend: str = "auto", chunk_rows: int = DEFAULT_CHUNK_ROWS,
                    options: KernelOptions | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal received attention from a given log-sum-exp: ``(refined lse [B, Hq, Tq], scores [B, Hq, Tk])``.

    The query rows are the last ``Tq`` of the ``Tk`` keys (of each row's first ``ends[b]`` keys when ``ends`` [B] is
    given) and see the keys at or before their position; ``starts`` [B] (left padding): keys before it, and rows
    before it, see nothing.  ``lse`` ``[B, Hq, Tq]``: each row's log-sum-exp as the attention kernel gave it
    (natural log; a non-finite entry makes the row see nothing).  With ``p_ij = exp(scale q_i.k_j - lse_i)`` on the
    seen keys and ``row_i = sum_j p_ij``: the refined lse is ``lse_i + log(row_i)`` (``-inf`` for a row that sees no
    key), the score of key j ``sum_i (p_ij / row_i) / min(Tq, Tk - j)`` (the mean attention the key receives from
    the query positions at or after it: ``N - j`` when ``Tq == Tk``); ``columns=False`` skips the scores (None).
    float32 (float64 for float64 inputs on the torch path); no gradient.  ``backend``: as
    :func:`received_attention` (Triton: fp16/bf16/fp32, head dims up to 256); ``chunk_rows``: the torch path's
    query rows per chunk.
    """
    backend = _validate(q, k, None, backend, chunk_rows, where="received_causal")
    B, Hq, Tq = q.shape[:3]
    if tuple(lse.shape) != (B, Hq, Tq):
        raise ValueError(f"received_causal: lse must be [B, Hq, Tq] = {(B, Hq, Tq)}; got {tuple(lse.shape)}")
    for name, bound in (("starts", starts), ("ends", ends)):
        if bound is not None and (bound.dim() != 1 or bound.shape[0] != B or bound.is_floating_point()):
            raise ValueError(f"received_causal: {name} must be an integer tensor [B={B}]; got {bound.dtype} "
                             f"{tuple(bound.shape)}")
    scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    q, k, lse = q.detach(), k.detach(), lse.detach()
    if Tq == 0 or k.shape[2] == 0:
        scores = q.new_zeros(B, Hq, k.shape[2], dtype=_compute_dtype(q)) if columns else None
        refined = torch.full((B, Hq, Tq), float("-inf"), dtype=_compute_dtype(q), device=q.device)
        return (refined if k.shape[2] == 0 else lse.to(_compute_dtype(q))), scores
    if backend == "torch":
        return received_causal_torch(q, k, lse, scale=scale, starts=starts, ends=ends, columns=columns,
                                     chunk_rows=chunk_rows)
    from . import triton_causal

    return triton_causal.forward(q, k, lse, starts, ends, scale, resolve_options(options), columns)


def _compute_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _validate(q, k, mask, requested, chunk_rows, where="received_attention") -> str:
    """Shapes, dtypes and devices; returns the backend that runs ("triton" or "torch")."""
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
