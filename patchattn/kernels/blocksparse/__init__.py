"""Block-sparse flash attention: each query block reads a listed set of key blocks.

Entry point :func:`block_sparse_attention`; helpers to build and inspect block lists. Backends:
``torch`` (pure torch, :mod:`.reference`) and ``triton`` (:mod:`.triton_fwd`, :mod:`.triton_bwd`,
:mod:`.decode`; imported lazily so that ``TRITON_INTERPRET`` can be set first). Launch options:
``options=`` (:class:`patchattn.kernels.KernelOptions`, or the scoped :func:`patchattn.kernels.kernel_options`).
See README.md for the math, the index layout and the dispatch rules.

This package imports only torch (and triton, lazily) plus its own modules and ``kernels.options``.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

from ..options import DEFAULT_OPTIONS, KernelOptions, resolve_options
from . import reference
from ._memo import ListMemo

__all__ = [
    "block_sparse_attention",
    "blocks_from_mask",
    "mask_from_blocks",
    "causal_blocks",
    "dense_blocks",
    "density",
    "density_tensor",
    "BACKENDS",
]

BACKENDS = ("auto", "triton", "torch")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Single-token (or few-token) queries go through the split-K decode kernel below this many queries.
DECODE_MAX_QUERIES = 16
# Checking for the full set costs a host sync (~0.1-0.3 ms); below this much work (B*Hq*Tq*Tk*D,
# about T = 8k at 32 heads x 128) the kernel's gap to SDPA is smaller than that, so don't check.  Lists made by
# causal_blocks / dense_blocks are known full without a check, at any size.
DENSE_CHECK_MIN_WORK = 1 << 39


class Options(NamedTuple):
    """The static options every backend needs, and the Triton kernels' launch options."""
    block_q: int
    block_k: int
    causal: bool
    scale: float
    softcap: float | None
    kernel: KernelOptions = DEFAULT_OPTIONS


# --------------------------------------------------------------------------------------------
# Public entry
# --------------------------------------------------------------------------------------------
def block_sparse_attention(q, k, v, kv_indices, kv_counts, *, block_q: int = 64, block_k: int = 64,
                           causal: bool = True, scale: float | None = None,
                           softcap: float | None = None, kv_start=None, kv_end=None,
                           col_bias=None, head_gain=None, active=None, return_lse: bool = False,
                           lists_from_start: bool = False, backend: str = "auto",
                           options: KernelOptions | None = None, tile_masks=None, tile_mask_ids=None):
    """Attention where query block ``m`` of (batch b, head h) reads only the key blocks
    ``kv_indices[b, h, m, :kv_counts[b, h, m]]``.

    q ``[B, Hq, Tq, D]``, k/v ``[B, Hkv, Tk, D]`` (Hq % Hkv == 0, GQA/MQA read k/v in place).
    kv_indices int32 ``[B', H', NQ, K]`` strictly ascending key-block ids, kv_counts int32
    ``[B', H', NQ]``; B' in {1, B}, H' in {1, Hkv, Hq}, NQ = ceil(Tq / block_q).
    With ``causal``, query i sits at key position ``i + Tk - Tq``. Rows with no visible key give 0
    (lse = -inf). Returns ``out [B, Hq, Tq, D]`` in q's dtype, or ``(out, lse [B, Hq, Tq] fp32)``.
    ``options``: the Triton kernels' launch options (None: those in effect, see :func:`kernel_options`).
    ``lists_from_start`` (decoding, Tq <= block_q, with ``kv_start``/``kv_end``): each row's block ids count from its
    ``kv_start`` (block j holds keys ``kv_start + j * block_k ...``) and its queries are the last of its keys
    (query i at ``kv_end - Tq + i``), so one launch serves rows whose real keys start at different offsets (a
    padded batch in a static cache) exactly as each row alone; ``kv_end`` may stop before ``Tk`` (empty slots).

    **Partial tiles** (FlexAttention's full/partial blocks): ``tile_mask_ids`` int32, the shape of ``kv_indices``,
    gives each list entry's element mask: ``-1`` = the whole key block is visible (the fast path, as without tiles),
    ``p >= 0`` = only the keys where ``tile_masks[p][i, j]`` is True are visible to the query at offset ``i`` of its
    query block, key offset ``j`` of the key block; ``tile_masks`` bool ``[P, block_q, block_k]`` is one pool shared
    by every batch, head and entry (identical tiles stored once).  ``p`` must be < P (checked on CPU only: on a GPU
    the check would cost a host sync).  The element mask is ANDed with ``causal``, ``kv_start``/``kv_end`` and
    ``Tk``; ``col_bias``, ``softcap``, ``head_gain`` and ``active`` apply as without tiles.  Forward and backward
    are exact, and rows that see no key give 0.  Cost: a partial tile loads its ``block_q x block_k`` bytes of mask
    and takes the masked branch (one ``where`` per score tile), in the forward, the dQ and the dK/dV pass; a whole
    tile (-1) costs what it costs without tiles, so build masks whose tiles are mostly whole (permute tokens so that
    neighbourhoods fill blocks) and keep partial tiles to the edges.  With tile masks the split-K decode kernel is
    not used (small ``Tq`` runs the prefill kernel), nor the dense SDPA fallback; ``lists_from_start`` is refused.
    See :mod:`patchattn.masks.tiles` to build the lists and tiles from a token mask.
    """
    backend = _resolve_backend(backend, q)
    _validate(q, k, v, kv_indices, kv_counts, block_q, block_k, kv_start, kv_end, col_bias,
              head_gain, active, softcap, backend)
    if lists_from_start:
        _validate_from_start(q, kv_indices, block_q, kv_start, kv_end, col_bias)
    if tile_masks is not None or tile_mask_ids is not None:
        _validate_tiles(q, kv_indices, tile_masks, tile_mask_ids, block_q, block_k, lists_from_start)
        tile_masks, tile_mask_ids = _tile_inputs(tile_masks, tile_mask_ids)
    if kv_indices.dtype != torch.int32 or kv_counts.dtype != torch.int32:  # (methods' lists are int32 already)
        kv_indices, kv_counts = _as_int32(kv_indices), _as_int32(kv_counts)
    kv_start = None if kv_start is None else _as_int32(kv_start)
    kv_end = None if kv_end is None else _as_int32(kv_end)
    opts = Options(block_q, block_k, bool(causal),
                   float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1]),
                   None if softcap is None else float(softcap), resolve_options(options))
    if backend == "torch":
        return reference.block_sparse_attention_torch(
            q, k, v, kv_indices, kv_counts, block_q=block_q, block_k=block_k, causal=opts.causal,
            scale=opts.scale, softcap=opts.softcap, kv_start=kv_start, kv_end=kv_end,
            col_bias=col_bias, head_gain=head_gain, active=active, return_lse=return_lse,
            lists_from_start=lists_from_start, tile_masks=tile_masks, tile_mask_ids=tile_mask_ids)
    return _triton_attention(q, k, v, kv_indices, kv_counts, opts, kv_start, kv_end, col_bias,
                             head_gain, active, return_lse, lists_from_start, tile_masks, tile_mask_ids)


# --------------------------------------------------------------------------------------------
# Block-list helpers
# --------------------------------------------------------------------------------------------
def blocks_from_mask(block_mask: torch.Tensor, width: int | None = None, backend: str = "auto"):
    """bool ``[B', H', NQ, NK]`` -> (kv_indices int32 ``[B', H', NQ, K]``, kv_counts int32 ``[B', H', NQ]``).

    K is ``width`` if given (it must be >= every row's count), else the largest row count (at least 1), which
    costs a device-to-host sync; entries past a row's count are 0.  ``backend``: "triton" compacts each row by a
    prefix sum in one kernel ("auto": on CUDA tensors), "torch" sorts the rows (the reference).
    """
    if block_mask.dim() != 4 or block_mask.dtype != torch.bool:
        raise ValueError(f"block_mask must be a bool tensor [B', H', NQ, NK], got "
                         f"{tuple(block_mask.shape)} {block_mask.dtype}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    n_k = block_mask.shape[-1]
    counts = block_mask.sum(dim=-1, dtype=torch.int32)
    if width is None:
        width = max(1, int(counts.max().item()) if counts.numel() else 1)
    width = max(1, min(width, n_k))
    if backend == "triton" or (backend == "auto" and block_mask.is_cuda and _triton_installed()):
        from . import triton_lists
        return triton_lists.compact(block_mask, width), counts.contiguous()
    cols = torch.arange(n_k, device=block_mask.device, dtype=torch.int32)
    order = torch.where(block_mask, cols, cols + n_k).sort(dim=-1).values
    idx = order[..., :width]
    idx = torch.where(idx < n_k, idx, torch.zeros_like(idx))
    return idx.to(torch.int32).contiguous(), counts.contiguous()


def mask_from_blocks(kv_indices: torch.Tensor, kv_counts: torch.Tensor, num_k_blocks: int):
    """(kv_indices, kv_counts) -> bool ``[B', H', NQ, num_k_blocks]``."""
    valid = torch.arange(kv_indices.shape[-1], device=kv_indices.device) < kv_counts[..., None]
    valid = valid & (kv_indices >= 0) & (kv_indices < num_k_blocks)
    hits = torch.zeros(*kv_indices.shape[:-1], num_k_blocks, dtype=torch.int32,
                       device=kv_indices.device)
    hits.scatter_add_(-1, kv_indices.long().clamp(0, num_k_blocks - 1), valid.to(torch.int32))
    return hits > 0


_FULL_SET_CACHE = ListMemo()


def causal_block_counts(Tq: int, Tk: int, block_q: int, block_k: int, device=None):
    """Per query block, how many key blocks the causal rule allows (they are blocks 0..n-1)."""
    n_q, n_k = math.ceil(Tq / block_q), math.ceil(Tk / block_k)
    m = torch.arange(n_q, device=device)
    last_key = torch.clamp((m + 1) * block_q, max=Tq) - 1 + (Tk - Tq)
    return torch.clamp(torch.div(last_key, block_k, rounding_mode="floor") + 1, 0, n_k).to(torch.int32)


def causal_blocks(Tq: int, Tk: int, block_q: int, block_k: int, device=None):
    """The full causal block set as ([1, 1, NQ, NK] indices, [1, 1, NQ] counts).  The pair is remembered as full
    (while unmodified), so a causal call with it goes to SDPA without a device-to-host check."""
    n_q, n_k = math.ceil(Tq / block_q), math.ceil(Tk / block_k)
    counts = causal_block_counts(Tq, Tk, block_q, block_k, device)
    idx = torch.arange(n_k, device=device, dtype=torch.int32).expand(n_q, n_k)
    idx, counts = idx.contiguous().view(1, 1, n_q, n_k), counts.view(1, 1, n_q)
    _FULL_SET_CACHE.put(idx, counts, (Tq, Tk, block_q, block_k, True), True)
    return idx, counts


def dense_blocks(Tq: int, Tk: int, block_q: int, block_k: int, device=None):
    """Every key block for every query block (non-causal full set; also full under the causal rule, which only
    hides more).  Remembered as full, as :func:`causal_blocks`."""
    n_q, n_k = math.ceil(Tq / block_q), math.ceil(Tk / block_k)
    idx = torch.arange(n_k, device=device, dtype=torch.int32).expand(n_q, n_k).contiguous().view(1, 1, n_q, n_k)
    counts = torch.full((1, 1, n_q), n_k, device=device, dtype=torch.int32)
    for causal in (True, False):
        _FULL_SET_CACHE.put(idx, counts, (Tq, Tk, block_q, block_k, causal), True)
    return idx, counts


def density(kv_counts: torch.Tensor, Tq: int, Tk: int, block_q: int, block_k: int,
            causal: bool = True) -> float:
    """Fraction of the allowed key blocks (causally allowed when ``causal``) that the lists read."""
    return float(density_tensor(kv_counts, Tq, Tk, block_q, block_k, causal))


def density_tensor(kv_counts: torch.Tensor, Tq: int, Tk: int, block_q: int, block_k: int,
                   causal: bool = True) -> torch.Tensor:
    """:func:`density` as a 0-d fp64 tensor on the lists' device: no device-to-host sync."""
    if causal:
        allowed = causal_block_counts(Tq, Tk, block_q, block_k, kv_counts.device)
    else:
        allowed = torch.full((math.ceil(Tq / block_q),), math.ceil(Tk / block_k),
                             device=kv_counts.device, dtype=torch.int32)
    read = torch.minimum(kv_counts, allowed).sum(dtype=torch.float64)
    total = allowed.sum(dtype=torch.float64) * (kv_counts.numel() // max(1, allowed.numel()))
    return torch.where(total > 0, read / total.clamp(min=1), 0.0)


# --------------------------------------------------------------------------------------------
# Backend choice and validation
# --------------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_installed() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return True


def _resolve_backend(backend, q):
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "auto":
        usable = (q.is_cuda or _interpreting()) and _triton_installed()
        return "triton" if usable and q.dtype in TRITON_DTYPES else "torch"
    if backend == "triton":
        if not (q.is_cuda or _interpreting()):
            raise RuntimeError(
                "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is "
                "imported, for the CPU interpreter); use backend='torch' on CPU")
        if not _triton_installed():
            raise RuntimeError("backend='triton' needs the triton package; use backend='torch'")
    return backend


def _fail(name, got, allowed):
    raise ValueError(f"{name}: got {got}; allowed: {allowed}")


def _as_int32(t):
    return t if t.dtype == torch.int32 else t.to(torch.int32)


def _validate(q, k, v, kv_indices, kv_counts, block_q, block_k, kv_start, kv_end, col_bias,
              head_gain, active, softcap, backend):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            _fail(name, getattr(t, "shape", type(t)), "a 4-D tensor [B, H, T, D]")
    dtypes = TRITON_DTYPES if backend == "triton" else TRITON_DTYPES + (torch.float64,)
    if q.dtype not in dtypes:
        _fail("q.dtype", q.dtype, ", ".join(map(str, dtypes)))
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            _fail(f"{name}.dtype", t.dtype, f"q's dtype {q.dtype}")
        if t.device != q.device:
            _fail(f"{name}.device", t.device, f"q's device {q.device}")
    B, Hq, Tq, D = q.shape
    if k.shape != v.shape:
        _fail("v.shape", tuple(v.shape), f"k's shape {tuple(k.shape)}")
    if k.shape[0] != B or k.shape[3] != D:
        _fail("k.shape", tuple(k.shape), f"[{B}, Hkv, Tk, {D}] (q's batch and head_dim)")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv:
        _fail("k.shape[1] (Hkv)", Hkv, f"a divisor of Hq={Hq}")
    for name, bs in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(bs, int) or bs <= 0:
            _fail(name, bs, "a positive int")
        if backend == "triton" and (bs < 16 or bs & (bs - 1)):
            _fail(name, bs, "a power of two >= 16 with backend='triton'")
    n_q = math.ceil(Tq / block_q)
    if not isinstance(kv_indices, torch.Tensor) or kv_indices.dim() != 4:
        _fail("kv_indices", getattr(kv_indices, "shape", type(kv_indices)), "int32 [B', H', NQ, K]")
    if kv_indices.dtype not in (torch.int32, torch.int64):
        _fail("kv_indices.dtype", kv_indices.dtype, "torch.int32 (int64 is converted)")
    Bp, Hp, nq, _ = kv_indices.shape
    if Bp not in (1, B):
        _fail("kv_indices.shape[0]", Bp, f"1 or B={B}")
    if Hp not in (1, Hkv, Hq):
        _fail("kv_indices.shape[1]", Hp, f"1, Hkv={Hkv} or Hq={Hq}")
    if nq != n_q:
        _fail("kv_indices.shape[2]", nq, f"NQ = ceil(Tq / block_q) = {n_q}")
    if not isinstance(kv_counts, torch.Tensor) or tuple(kv_counts.shape) != (Bp, Hp, nq):
        _fail("kv_counts.shape", tuple(getattr(kv_counts, "shape", ())), f"{(Bp, Hp, nq)}")
    if kv_counts.dtype not in (torch.int32, torch.int64):
        _fail("kv_counts.dtype", kv_counts.dtype, "torch.int32 (int64 is converted)")
    for name, t in (("kv_indices", kv_indices), ("kv_counts", kv_counts)):
        if t.device != q.device:
            _fail(f"{name}.device", t.device, f"q's device {q.device}")
    for name, t in (("kv_start", kv_start), ("kv_end", kv_end)):
        if t is not None and (t.shape != (B,) or t.dtype not in (torch.int32, torch.int64)):
            _fail(name, f"{tuple(t.shape)} {t.dtype}", f"int32 [B={B}]")
    if col_bias is not None:
        ok = (col_bias.dim() == 3 and col_bias.shape[0] in (1, B)
              and col_bias.shape[1] in (1, Hkv, Hq) and col_bias.shape[2] == k.shape[2]
              and col_bias.is_floating_point())
        if not ok:
            _fail("col_bias", f"{tuple(col_bias.shape)} {col_bias.dtype}",
                  f"float [1|B, 1|Hkv|Hq, Tk={k.shape[2]}]")
    if head_gain is not None:
        ok = head_gain.is_floating_point() and (
            tuple(head_gain.shape) == (B, Tq, Hq)
            or (head_gain.dim() == 2 and head_gain.shape[0] in (1, B) and head_gain.shape[1] == Hq))
        if not ok:
            _fail("head_gain", f"{tuple(head_gain.shape)} {head_gain.dtype}",
                  f"float [B, Tq, Hq] = {(B, Tq, Hq)} or [1|B, Hq]")
    if active is not None and (tuple(active.shape) != (B, Tq, Hq) or active.dtype != torch.bool):
        _fail("active", f"{tuple(active.shape)} {active.dtype}", f"bool [B, Tq, Hq] = {(B, Tq, Hq)}")
    if softcap is not None and not softcap > 0:
        _fail("softcap", softcap, "None or a positive float")


def _validate_tiles(q, kv_indices, tile_masks, tile_mask_ids, block_q, block_k, lists_from_start):
    if (tile_masks is None) != (tile_mask_ids is None):
        _fail("tile_masks / tile_mask_ids", "only one of them", "both (partial tiles) or neither (whole blocks)")
    if lists_from_start:
        _fail("lists_from_start", "with tile masks", "lists counted from key 0 (lists_from_start=False)")
    if not isinstance(tile_mask_ids, torch.Tensor) or tuple(tile_mask_ids.shape) != tuple(kv_indices.shape):
        _fail("tile_mask_ids.shape", tuple(getattr(tile_mask_ids, "shape", ())),
              f"kv_indices' shape {tuple(kv_indices.shape)}")
    if tile_mask_ids.dtype not in (torch.int32, torch.int64):
        _fail("tile_mask_ids.dtype", tile_mask_ids.dtype, "torch.int32 (int64 is converted)")
    if not isinstance(tile_masks, torch.Tensor) or tile_masks.dim() != 3 or tile_masks.dtype != torch.bool \
            or tuple(tile_masks.shape[1:]) != (block_q, block_k):
        _fail("tile_masks", f"{tuple(getattr(tile_masks, 'shape', ()))} {getattr(tile_masks, 'dtype', None)}",
              f"bool [P, block_q={block_q}, block_k={block_k}]")
    for name, t in (("tile_masks", tile_masks), ("tile_mask_ids", tile_mask_ids)):
        if t.device != q.device:
            _fail(f"{name}.device", t.device, f"q's device {q.device}")
    if tile_mask_ids.device.type == "cpu" and tile_mask_ids.numel() and not torch.compiler.is_compiling():
        # (on a GPU, or in a compiled graph, this value check would be a host sync)
        low, high = int(tile_mask_ids.min()), int(tile_mask_ids.max())
        if low < -1 or high >= tile_masks.shape[0]:
            _fail("tile_mask_ids", f"values in [{low}, {high}]",
                  f"-1 (whole block) or a tile index below P={tile_masks.shape[0]}")


def _tile_inputs(tile_masks, tile_mask_ids):
    """Tiles as the kernels read them (contiguous int32 ids; ``None, None`` when the pool is empty: every id is -1)."""
    if tile_masks.shape[0] == 0:
        return None, None
    return tile_masks.contiguous(), _as_int32(tile_mask_ids)


# --------------------------------------------------------------------------------------------
# Triton dispatch
# --------------------------------------------------------------------------------------------
def _validate_from_start(q, kv_indices, block_q, kv_start, kv_end, col_bias):
    if kv_start is None or kv_end is None:
        _fail("lists_from_start", True, "kv_start and kv_end given (the rows' real keys)")
    if kv_indices.shape[2] != 1 or q.shape[2] > DECODE_MAX_QUERIES:
        _fail("lists_from_start", f"Tq={q.shape[2]}", f"decoding: one query block of at most {DECODE_MAX_QUERIES}")
    if col_bias is not None:
        _fail("lists_from_start", "with col_bias", "no col_bias (its columns are absolute positions)")


def _triton_attention(q, k, v, kv_indices, kv_counts, opts, kv_start, kv_end, col_bias,
                      head_gain, active, return_lse, lists_from_start=False, tile_masks=None, tile_mask_ids=None):
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if col_bias is not None and col_bias.requires_grad and torch.is_grad_enabled():
        raise ValueError("col_bias: gradients w.r.t. col_bias are supported by backend='torch' "
                         "only; detach it or use backend='torch'")
    # A gain that needs a gradient is applied outside the kernel, so autograd sees it.
    outer_gain = head_gain if head_gain is not None and head_gain.requires_grad else None
    kernel_gain = None if outer_gain is not None else head_gain

    if lists_from_start and needs_grad:
        _fail("lists_from_start", "with gradients", "inference (the decode kernel has no backward)")
    tiled = tile_masks is not None  # partial tiles: neither SDPA (a full set is not dense) nor the decode kernel
    if not lists_from_start and not tiled and _use_dense_fallback(q, k, kv_indices, kv_counts, opts, kv_start,
                                                                  kv_end, col_bias, active, return_lse):
        out = _sdpa_dense(q, k, v, opts)
        return out * reference._gain_as_bhtd(head_gain).to(out.dtype) if head_gain is not None else out

    decoding = lists_from_start or (not needs_grad and not tiled and q.shape[2] <= DECODE_MAX_QUERIES
                                    and kv_indices.shape[2] == 1)
    if decoding and torch.compiler.is_compiling():
        # One opaque operator to the compiler: it traces no launch code, and the step stays whole (fullgraph)
        # and capturable in a CUDA graph.
        out, lse = torch.ops.patchattn.block_sparse_decode(
            q, k, v, kv_indices, kv_counts, kv_start, kv_end, col_bias, kernel_gain, active, opts.block_q,
            opts.block_k, opts.causal, opts.scale, opts.softcap, lists_from_start)
    elif decoding:
        from . import decode
        out, lse = decode.decode_attention(q, k, v, kv_indices, kv_counts, opts, kv_start, kv_end,
                                           col_bias, kernel_gain, active, return_lse,
                                           from_start=lists_from_start)
    else:
        out, lse = _BlockSparseAttention.apply(q, k, v, kv_indices, kv_counts, opts, kv_start,
                                               kv_end, col_bias, kernel_gain, active,
                                               return_lse or needs_grad, tile_masks, tile_mask_ids)
    if outer_gain is not None:
        out = out * reference._gain_as_bhtd(outer_gain).to(out.dtype)
    return (out, lse) if return_lse else out


@torch.library.custom_op("patchattn::block_sparse_decode", mutates_args=())
def _decode_operator(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_indices: torch.Tensor,
                     kv_counts: torch.Tensor, kv_start: torch.Tensor | None, kv_end: torch.Tensor | None,
                     col_bias: torch.Tensor | None, head_gain: torch.Tensor | None, active: torch.Tensor | None,
                     block_q: int, block_k: int, causal: bool, scale: float, softcap: float | None,
                     from_start: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton decode launch as one operator, for compiled graphs (the launch options in effect apply)."""
    from . import decode

    opts = Options(block_q, block_k, causal, scale, softcap, resolve_options(None))
    return decode.decode_attention(q, k, v, kv_indices, kv_counts, opts, kv_start, kv_end, col_bias, head_gain,
                                   active, True, from_start=from_start)


@_decode_operator.register_fake
def _decode_operator_shapes(q, k, v, kv_indices, kv_counts, kv_start, kv_end, col_bias, head_gain, active,
                            block_q, block_k, causal, scale, softcap, from_start):
    batch, heads, queries, dim = q.shape
    out = q.new_empty(batch, queries, heads, dim).transpose(1, 2)  # the kernel's [B, Tq, Hq, D] memory
    return out, q.new_empty(batch, heads, queries, dtype=torch.float32)


def _use_dense_fallback(q, k, kv_indices, kv_counts, opts, kv_start, kv_end, col_bias, active,
                        return_lse):
    """SDPA computes the same function only for the full block set with no hooks; check that."""
    Tq, Tk = q.shape[2], k.shape[2]
    if not opts.kernel.dense_fallback or return_lse or opts.softcap is not None:
        return False
    if any(t is not None for t in (kv_start, kv_end, col_bias, active)):
        return False
    if q.shape[2] <= DECODE_MAX_QUERIES:  # decode: the split-K kernel is as fast, and no host sync
        return False
    if opts.causal and Tq != Tk:  # SDPA's is_causal is top-left aligned
        return False
    if kv_indices.shape[-1] < math.ceil(Tk / opts.block_k):  # the last query block reads every
        return False                                         # key block: decided without a sync
    key = (Tq, Tk, opts.block_q, opts.block_k, opts.causal)
    known = _FULL_SET_CACHE.peek(kv_indices, kv_counts, key)  # checked before, or made by causal/dense_blocks
    if known is not None:
        return known
    if q.shape[0] * q.shape[1] * Tq * Tk * q.shape[3] < DENSE_CHECK_MIN_WORK:
        return False
    # Same live list tensors, unmodified since: no host sync.
    return _FULL_SET_CACHE.get(kv_indices, kv_counts, key,
                               lambda: _is_full_block_set(q, Tk, kv_indices, kv_counts, opts))


def _is_full_block_set(q, Tk, kv_indices, kv_counts, opts):
    Tq = q.shape[2]
    if opts.causal:
        allowed = causal_block_counts(Tq, Tk, opts.block_q, opts.block_k, q.device)
    else:
        allowed = torch.full((kv_indices.shape[2],), math.ceil(Tk / opts.block_k),
                             device=q.device, dtype=torch.int32)
    listed = torch.arange(kv_indices.shape[-1], device=q.device) < kv_counts[..., None]
    inside = listed & (kv_indices < allowed[:, None]) & (kv_indices >= 0)
    return bool((inside.sum(-1) == allowed).all())


def _sdpa_dense(q, k, v, opts):
    # enable_gqa reads shared K/V in place; on the H200 it is as fast as repeating K/V (RESULTS.md).
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=opts.causal and q.shape[2] > 1, scale=opts.scale,
        enable_gqa=q.shape[1] != k.shape[1])


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kv_indices, kv_counts, opts, kv_start, kv_end, col_bias, head_gain,
                active, need_lse, tile_masks=None, tile_mask_ids=None):
        from . import triton_fwd
        out, lse = triton_fwd.forward(q, k, v, kv_indices, kv_counts, opts, kv_start, kv_end,
                                      col_bias, head_gain, active, need_lse, tile_masks=tile_masks,
                                      tile_mask_ids=tile_mask_ids)
        ctx.save_for_backward(q, k, v, out, lse, kv_indices, kv_counts, kv_start, kv_end,
                              col_bias, head_gain, active, tile_masks, tile_mask_ids)
        ctx.opts = opts
        if lse is not None:
            ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, _d_lse):
        from . import triton_bwd
        (q, k, v, out, lse, idx, cnt, kv_start, kv_end, col_bias, head_gain, active, tile_masks,
         tile_mask_ids) = ctx.saved_tensors
        dq, dk, dv = triton_bwd.backward(d_out, q, k, v, out, lse, idx, cnt, ctx.opts, kv_start,
                                         kv_end, col_bias, head_gain, active, tile_masks=tile_masks,
                                         tile_mask_ids=tile_mask_ids)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None
