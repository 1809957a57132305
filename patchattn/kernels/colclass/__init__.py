"""Class-mass attention: for every query row, the share of its softmax attention on three classes of key columns,
and two class-restricted outputs, in one pass over its causal keys.

Entry point :func:`class_attention`.  Each key ``j`` of batch row ``b`` has a class code ``classes[b, j]`` (int8
or uint8; bit 0, bit 1, bit 2 are three independent memberships, a key may be in several or none).  With
``p_j = softmax_j`` over the row's visible keys (causal, queries are the last ``Tq`` keys, from ``kv_start[b]`` on):

* ``mass[..., c] = sum_{j in bit c} p_j``  (c = 0, 1, 2),
* ``normalised = sum_{j in bit 0} p_j v_j / mass[..., 0]`` -- the output restricted to bit 0 and renormalised there,
* ``weighted = sum_{j in bit 1} p_j v_j`` -- bit 1's part of the row's output.

Rows that see no key of a class give 0 for it (never NaN).  ``var`` uses it with bit 0 = the image's non-sink
tokens, bit 1 = the sinks that give up attention, bit 2 = the visual sinks (``patchattn/methods/var.py``).  Backends:
``torch`` (:mod:`.reference`, chunked over query rows; the CPU path and the oracle) and ``triton``
(:mod:`.triton_fwd`, imported lazily so ``TRITON_INTERPRET`` can be set first).  Forward only: the outputs carry no
gradient.  Launch options: ``options=`` (:class:`patchattn.kernels.KernelOptions`) or the scoped
:func:`patchattn.kernels.kernel_options`.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from ..blocksparse import BACKENDS, TRITON_DTYPES, _resolve_backend
from ..inputs import check_qkv
from ..options import KernelOptions, resolve_options
from .reference import CLASS_BITS, class_attention_torch

__all__ = ["BACKENDS", "CLASS_BITS", "ClassAttention", "class_attention"]

CODE_DTYPES = (torch.int8, torch.uint8)
MAX_TRITON_HEAD_DIM = 256


class ClassAttention(NamedTuple):
    """``mass [B, Hq, Tq, 3]``, ``normalised`` and ``weighted [B, Hq, Tq, D]``; float32 (float64 for float64 inputs
    on the torch path)."""
    mass: torch.Tensor
    normalised: torch.Tensor
    weighted: torch.Tensor


def class_attention(q, k, v, classes, *, scale: float | None = None, kv_start=None, backend: str = "auto",
                    options: KernelOptions | None = None) -> ClassAttention:
    """Per-row attention mass on three key classes and two class-restricted outputs (see the module docstring).

    q ``[B, Hq, Tq, D]``, k/v ``[B, Hkv, Tk, D]`` (``Hq % Hkv == 0``: GQA/MQA read k/v in place), ``Tq <= Tk``;
    query ``i`` sits at key position ``i + Tk - Tq``.  ``classes`` int8/uint8 ``[B, Tk]``; ``kv_start`` int
    ``[B]``: each row's first real key (left padding; keys before it are never seen).  ``scale`` defaults to
    ``1/sqrt(D)``.  ``backend``: "auto" (Triton on CUDA or under ``TRITON_INTERPRET=1`` for fp16/bf16/fp32 and head
    dims up to 256, else torch), "triton", "torch".
    """
    backend = _validate(q, k, v, classes, kv_start, backend)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        warnings.warn("patchattn class_attention is forward only (written for training-free methods such as var): "
                      "its outputs carry no gradient", stacklevel=2)
    scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    kv_start = None if kv_start is None else kv_start.to(device=q.device, dtype=torch.int32)
    if any(t.requires_grad for t in (q, k, v)):
        q, k, v = q.detach(), k.detach(), v.detach()
    if q.shape[2] == 0:
        empty = q.new_zeros(*q.shape[:3], q.shape[-1], dtype=_compute_dtype(q))
        return ClassAttention(empty[..., :CLASS_BITS].clone(), empty, empty.clone())
    if backend == "torch":
        return ClassAttention(*class_attention_torch(q, k, v, classes, scale=scale, kv_start=kv_start))
    from . import triton_fwd

    return ClassAttention(*triton_fwd.forward(q, k, v, classes, kv_start, scale, resolve_options(options)))


def _compute_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _validate(q, k, v, classes, kv_start, requested) -> str:
    """Shapes, dtypes and devices; returns the backend that runs ("triton" or "torch")."""
    where = "class_attention"
    check_qkv(where, q, k, v)
    B, D = q.shape[0], q.shape[3]
    Tk = k.shape[2]
    if classes.dtype not in CODE_DTYPES or tuple(classes.shape) != (B, Tk):
        raise ValueError(f"{where}: classes must be an int8 or uint8 tensor [B={B}, Tk={Tk}] (bits 0-2: class "
                         f"memberships); got {classes.dtype} {tuple(classes.shape)}")
    if kv_start is not None and (kv_start.is_floating_point() or tuple(kv_start.shape) != (B,)):
        raise ValueError(f"{where}: kv_start must be an integer tensor [B={B}]; got {kv_start.dtype} "
                         f"{tuple(kv_start.shape)}")
    if any(t.device != q.device for t in (k, v, classes)):
        raise ValueError(f"{where}: q, k, v and classes must be on one device")
    backend = _resolve_backend(requested, q)  # the engine's rule: Triton on CUDA or under the interpreter
    if backend == "triton" and not (q.dtype in TRITON_DTYPES and D <= MAX_TRITON_HEAD_DIM):
        if requested == "triton":
            raise ValueError(f"{where}: the Triton kernel takes fp16, bf16 or fp32 inputs with head dims up to "
                             f"{MAX_TRITON_HEAD_DIM}; got {q.dtype}, head dim {D} (backend='torch' takes any)")
        backend = "torch"
    return backend
