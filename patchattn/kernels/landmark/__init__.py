"""Landmark attention's grouped softmax at inference, in one kernel launch (``landmark``, issue 23).

Each query block of ``block`` rows (aligned on key blocks: the queries are the last ``Tq`` of ``Tk`` keys, and
``pad = (Tk - Tq) % block`` alignment rows in front of the first query complete its first block) reads its local
blocks (``c - local_blocks + 1 .. c``, causal) and every block of its list (``kv_indices[b, h, m, :kv_counts]``:
the union of its rows' retrieved blocks).  Row ``i`` weighs list entry ``r`` by its gate: ``pick_gate[b, h, i, p]``
where ``pick_entry[b, h, i, p] == r``, ``-inf`` where it did not retrieve that block.  Its output is one softmax over
{local keys: scores ``s_j``} and {list entries: gates ``g_r``}, a list entry's mass shared among its block's keys by
the block's own softmax::

    out_i = (sum_local e^{s_j} v_j + sum_r e^{g_r} softmax(s_{n_r, .}) v_{n_r}) / (sum_local e^{s_j} + sum_r e^{g_r})

Entry point :func:`landmark_block_attention` (``backend``: ``torch`` = :mod:`.reference`, ``triton`` =
:mod:`.triton_fwd`, imported lazily so ``TRITON_INTERPRET`` can be set first; ``auto`` = Triton on CUDA / under the
interpreter for fp16/bf16/fp32 and head dims up to 256).  **Forward only** (inference): the outputs carry no
gradient; training uses ``methods.landmark.grouped_landmark_training``.

This package imports only torch (and triton, lazily) plus ``kernels.blocksparse`` and ``kernels.options``.
"""
from __future__ import annotations

import math
import warnings

import torch

from ..blocksparse import BACKENDS, TRITON_DTYPES, _resolve_backend
from ..inputs import check_qkv
from ..options import KernelOptions, resolve_options
from .reference import landmark_block_attention_torch

__all__ = ["BACKENDS", "SPARSE_PICKS_MAX", "landmark_block_attention", "landmark_block_attention_torch",
           "uses_triton"]

MAX_TRITON_HEAD_DIM = 256
# Above this many picks per row the Triton path scatters the gates into a [Tq, W] matrix (the kernel then loads one
# column per list entry instead of comparing each of the row's picks with it).
SPARSE_PICKS_MAX = 16


def uses_triton(backend: str, q: torch.Tensor) -> bool:
    """Whether :func:`landmark_block_attention` runs the Triton kernel for ``backend`` and queries like ``q``."""
    resolved = _resolve_backend(backend, q)
    return resolved == "triton" and q.dtype in TRITON_DTYPES and q.shape[-1] <= MAX_TRITON_HEAD_DIM


def landmark_block_attention(q, k, v, kv_indices, kv_counts, pick_entry, pick_gate, *, block: int,
                             local_blocks: int, scale: float | None = None, softcap: float | None = None,
                             backend: str = "auto", options: KernelOptions | None = None) -> torch.Tensor:
    """The grouped softmax of the module docstring: ``[B, Hq, Tq, D]`` in q's dtype.

    q ``[B, Hq, Tq, D]``, k/v ``[B, Hkv, Tk, D]`` (``Hq % Hkv == 0``: GQA reads k/v in place), ``Tq <= Tk``.
    ``kv_indices`` int ``[B', H', NQ, W]`` (``B'`` in {1, B}, ``H'`` in {1, Hq}, ``NQ = ceil((Tq + pad) / block)``):
    each query block's list of *complete* key blocks strictly before its local blocks; ``kv_counts`` int
    ``[B', H', NQ]``.  ``pick_entry`` int ``[B, Hq, Tq, P]``: each row's retrieved blocks as entries of its query
    block's list (``-1``: no pick); ``pick_gate`` float ``[B, Hq, Tq, P]``: their gates (natural-log units).
    ``scale`` defaults to ``1/sqrt(D)``; ``softcap``: ``cap * tanh(s / cap)`` on the scores.
    """
    backend = _validate(q, k, v, kv_indices, kv_counts, pick_entry, pick_gate, block, local_blocks, backend)
    scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, pick_gate)):
        warnings.warn("patchattn landmark_block_attention is forward only (inference): its output carries no "
                      "gradient; training uses grouped_landmark_training", stacklevel=2)
    with torch.no_grad():
        if q.shape[2] == 0:
            return q.new_zeros(q.shape)
        if backend == "torch":
            return landmark_block_attention_torch(q, k, v, kv_indices, kv_counts, pick_entry, pick_gate,
                                                  block=block, local_blocks=local_blocks, scale=scale,
                                                  softcap=softcap)
        from . import triton_fwd

        return triton_fwd.forward(q, k, v, kv_indices, kv_counts, pick_entry, pick_gate, block, local_blocks, scale,
                                  softcap, resolve_options(options))


def _validate(q, k, v, kv_indices, kv_counts, pick_entry, pick_gate, block, local_blocks, requested) -> str:
    """Shapes, dtypes and devices; returns the backend that runs ("triton" or "torch")."""
    where = "landmark_block_attention"
    check_qkv(where, q, k, v)
    batch, heads, q_len, dim = q.shape
    kv_len = k.shape[2]
    if block < 16 or block & (block - 1) or local_blocks < 1:
        raise ValueError(f"{where}: block must be a power of 2 >= 16 and local_blocks >= 1; got {block}, "
                         f"{local_blocks}")
    n_q = math.ceil((q_len + (kv_len - q_len) % block) / block)
    if (kv_indices.dim() != 4 or kv_indices.shape[0] not in (1, batch) or kv_indices.shape[1] not in (1, heads)
            or kv_indices.shape[2] != n_q or kv_indices.is_floating_point()):
        raise ValueError(f"{where}: kv_indices must be an integer tensor [B' in (1, {batch}), H' in (1, {heads}), "
                         f"NQ={n_q}, W]; got {kv_indices.dtype} {tuple(kv_indices.shape)}")
    if tuple(kv_counts.shape) != tuple(kv_indices.shape[:3]) or kv_counts.is_floating_point():
        raise ValueError(f"{where}: kv_counts must be an integer tensor {tuple(kv_indices.shape[:3])}; got "
                         f"{kv_counts.dtype} {tuple(kv_counts.shape)}")
    if (pick_entry.dim() != 4 or tuple(pick_entry.shape[:3]) != (batch, heads, q_len)
            or pick_entry.shape != pick_gate.shape or pick_entry.is_floating_point()
            or not pick_gate.is_floating_point()):
        raise ValueError(f"{where}: pick_entry (integer) and pick_gate (float) must be [B={batch}, Hq={heads}, "
                         f"Tq={q_len}, P] alike; got {pick_entry.dtype} {tuple(pick_entry.shape)}, {pick_gate.dtype} "
                         f"{tuple(pick_gate.shape)}")
    if any(t.device != q.device for t in (k, v, kv_indices, kv_counts, pick_entry, pick_gate)):
        raise ValueError(f"{where}: every tensor must be on q's device ({q.device})")
    if requested not in BACKENDS:
        raise ValueError(f"{where}: backend must be one of {BACKENDS}, got {requested!r}")
    if uses_triton(requested, q):
        return "triton"
    if requested == "triton":
        _resolve_backend("triton", q)  # a clear error off CUDA without the interpreter
        raise ValueError(f"{where}: the Triton kernel takes fp16, bf16 or fp32 inputs with head dims up to "
                         f"{MAX_TRITON_HEAD_DIM}; got {q.dtype}, head dim {dim} (backend='torch' takes any)")
    return "torch"
