"""Block selection kernels: decode-time block top-k (the per-step choice of ``blocktopk`` and ``hip`` while
decoding), prefill block scores and choice (``blocktopk``) and HiP's prefill tree search (``hip``).

Every entry point returns its result on either backend: ``triton`` (:mod:`.triton_select`, :mod:`.triton_prefill`,
:mod:`.triton_tree`; the decode selection in two launches that also refresh the newest block's mean, no host sync,
so a decode step can be captured in a CUDA graph) where a kernel applies, else ``torch`` (:mod:`.reference`, also
the kernels' test oracle).  ``options``: the kernels' launch options (:class:`patchattn.kernels.KernelOptions`;
None: those in effect, see :func:`patchattn.kernels.kernel_options`).
"""
from __future__ import annotations

import torch

from ..blocksparse import _resolve_backend
from ..options import KernelOptions, resolve_options
from .reference import (
    best_query_rows,
    decode_block_topk_torch,
    forced_decode_blocks,
    group_scores,
    prefill_block_choice,
    prefill_block_scores_torch,
    prefill_block_select_torch,
    prefill_tree_search_torch,
    row_block_counts,
    row_block_means,
    tree_search_torch,
    update_row_tail_means,
    within_mass,
)

__all__ = ["best_query_rows", "decode_block_topk", "forced_decode_blocks", "group_scores", "within_mass", "max_list_width",
           "prefill_block_choice", "prefill_block_scores", "prefill_block_select", "prefill_tree_search",
           "row_block_counts", "row_block_means", "tree_search_torch"]


def max_list_width(n_k: int, top_k: int, sink_blocks: int, local_blocks: int) -> int:
    """An upper bound on any row's count: every list fits in this width."""
    return max(1, min(n_k, top_k + sink_blocks + local_blocks))


def decode_block_topk(q: torch.Tensor, k_means: torch.Tensor, *, top_k: int, sink_blocks: int = 1,
                      local_blocks: int = 2, mass: float = 1.0, per_head: bool = True, reduce: str = "max",
                      keys: torch.Tensor | None = None, block: int | None = None,
                      lengths: torch.Tensor | None = None, starts: torch.Tensor | None = None,
                      backend: str = "auto", options: KernelOptions | None = None):
    """Blocks a single query row per (batch, head) reads.

    Args:
        q: ``[B, Hq, D]`` the query (the newest position; it sits in the last key block).
        k_means: ``[B, Hkv, NK, D]`` the mean key of every block of the cache.
        top_k, sink_blocks, local_blocks, mass: as ``blocktopk``'s config (``mass`` >= 1 keeps ``top_k`` blocks).
        per_head: one list per query head; else one per KV head, scoring each block by the group's ``reduce``
            (``"max"`` or ``"mean"``) score.
        keys, block: optional ``[B, Hkv, T, D]`` keys and the block size: the newest block's mean (its rows from
            ``(NK - 1) * block`` to ``T``) is recomputed from them into ``k_means`` (in place) before scoring, so a
            decode step's cache update needs no launch of its own.
        lengths, starts: rows of different lengths (a padded batch, a static cache's empty slots), as ``[B]``
            device tensors: row ``b`` holds ``lengths[b]`` keys, its block ``j`` being keys ``starts[b] + j * block``
            ... of ``keys`` (``starts``: zeros when None); only its first ``ceil(lengths[b] / block)`` blocks of
            ``k_means`` are valid, the query sitting in the last of them (sinks count from block 0, the local blocks
            end at it; a row of length 0 reads nothing).  ``block`` is then required; with ``keys``, each row's
            newest block is refreshed.  No host read: the call keeps static shapes.

    Returns:
        ``(kv_indices int32 [B, H, 1, W], kv_counts int32 [B, H, 1])``, W = :func:`max_list_width`.
    """
    if q.dim() != 3 or k_means.dim() != 4 or q.shape[0] != k_means.shape[0] or q.shape[2] != k_means.shape[3]:
        raise ValueError(f"expected q [B, Hq, D] and k_means [B, Hkv, NK, D]; got {tuple(q.shape)} and "
                         f"{tuple(k_means.shape)}")
    if k_means.shape[1] == 0 or q.shape[1] % k_means.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k_means heads ({k_means.shape[1]})")
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce: got {reduce!r}; allowed: 'max', 'mean'")
    n_k = k_means.shape[2]
    args = dict(top_k=top_k, sink_blocks=sink_blocks, local_blocks=local_blocks, mass=mass, per_head=per_head,
                reduce=reduce, width=max_list_width(n_k, top_k, sink_blocks, local_blocks))
    if lengths is not None:
        return _decode_rows_topk(q, k_means, args, keys, block, lengths, starts, backend, options)
    tail = None
    if keys is not None:
        if block is None or not (n_k - 1) * block < keys.shape[2] <= n_k * block or keys.shape[:2] != k_means.shape[:2]:
            raise ValueError(f"keys {tuple(keys.shape)} with block {block} do not end in the last of the {n_k} blocks "
                             f"of k_means {tuple(k_means.shape)}")
        tail = (keys, keys.shape[2], block)
    if _resolve_backend(backend, q) == "triton":
        from . import triton_select

        if n_k <= triton_select.MAX_BLOCKS:
            return triton_select.decode_block_topk_triton(q, k_means, **args, options=resolve_options(options),
                                                          tail=tail)
    if tail is not None:
        update_tail_mean(k_means, *tail)
    return decode_block_topk_torch(q, k_means, **args)


def _decode_rows_topk(q, k_means, args, keys, block, lengths, starts, backend, options):
    """``decode_block_topk`` over rows of different lengths (``lengths`` given)."""
    batch = q.shape[0]
    if block is None:
        raise ValueError("lengths: the block size (block=) is required to count each row's blocks")
    if lengths.shape != (batch,) or (starts is not None and starts.shape != (batch,)):
        raise ValueError(f"lengths and starts: expected [{batch}] tensors; got {tuple(lengths.shape)} and "
                         f"{None if starts is None else tuple(starts.shape)}")
    if keys is not None and keys.shape[:2] != k_means.shape[:2]:
        raise ValueError(f"keys {tuple(keys.shape)} and k_means {tuple(k_means.shape)}: batch and heads differ")
    starts = torch.zeros_like(lengths) if starts is None else starts
    if _resolve_backend(backend, q) == "triton":
        from . import triton_select

        if k_means.shape[2] <= triton_select.MAX_BLOCKS:
            return triton_select.decode_block_topk_triton(q, k_means, **args, options=resolve_options(options),
                                                          rows=(keys, starts, lengths, block))
    if keys is not None:
        update_row_tail_means(k_means, keys, starts, lengths, block)
    return decode_block_topk_torch(q, k_means, **args, n_valid=row_block_counts(lengths, block))


def update_tail_mean(k_means: torch.Tensor, keys: torch.Tensor, kv_len: int, block: int) -> None:
    """Recompute the newest block's mean key (rows ``(NK - 1) * block`` to ``kv_len``) into ``k_means``."""
    start = (k_means.shape[2] - 1) * block
    k_means[:, :, -1] = keys[:, :, start:kv_len].mean(dim=2, dtype=torch.float32).to(k_means.dtype)


def _prefill_on_triton(backend: str, tensor: torch.Tensor, block_q: int) -> bool:
    """Whether a prefill selection kernel applies: the triton backend and query blocks of a power of two >= 16."""
    return _resolve_backend(backend, tensor) == "triton" and block_q >= 16 and not block_q & (block_q - 1)


def prefill_block_scores(query: torch.Tensor, k_means: torch.Tensor, *, block_q: int, block_k: int, kv_len: int,
                         per_head: bool = True, backend: str = "auto",
                         options: KernelOptions | None = None) -> torch.Tensor:
    """``[B, H, NQ, NK]`` fp32: the best row of each query block (and of its GQA group unless ``per_head``) dotted
    with each key-block mean, ``-inf`` after the block holding the query block's last position (causal, queries at
    the end of the keys).

    Args:
        query: ``[B, Hq, Tq, D]``; k_means: ``[B, Hkv, NK, D]`` with ``NK = ceil(kv_len / block_k)``.
    """
    args = dict(block_q=block_q, block_k=block_k, kv_len=kv_len, per_head=per_head)
    if not _prefill_on_triton(backend, query, block_q):
        return prefill_block_scores_torch(query, k_means, **args)
    from . import triton_prefill

    return triton_prefill.prefill_block_scores(query, k_means, **args, options=resolve_options(options))


def prefill_tree_search(query: torch.Tensor, k_means: torch.Tensor, *, block_q: int, block_k: int, kv_len: int,
                        k: int, per_head: bool = True, backend: str = "auto",
                        options: KernelOptions | None = None) -> torch.Tensor:
    """HiP's hierarchical top-k for every query block, scored by the block's best row (and its GQA group's unless
    ``per_head``): bool ``[B, H, NQ, NK]``, as :func:`.reference.tree_search_torch` gives for the same rows (the torch
    path where the kernel does not apply: no triton backend, or ``k`` above ``triton_tree.MAX_K``).

    Args:
        query: ``[B, Hq, Tq, D]``, the last ``Tq`` of ``kv_len`` positions; k_means: ``[B, Hkv, NK, D]``.
    """
    args = dict(block_q=block_q, block_k=block_k, kv_len=kv_len, k=k, per_head=per_head)
    if _prefill_on_triton(backend, query, block_q):
        from . import triton_tree

        if k <= triton_tree.MAX_K:
            return triton_tree.tree_search(query, k_means, **args, options=resolve_options(options))
    return prefill_tree_search_torch(query, k_means, **args)


def prefill_block_select(scores: torch.Tensor, *, q_len: int, block_q: int, block_k: int, kv_len: int, top_k: int,
                         sink_blocks: int, local_blocks: int, mass: float, head_dim: int, last_block_dense: bool,
                         backend: str = "auto",
                         options: KernelOptions | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``blocktopk``'s prefill choice from its ``[B, H, NQ, NK]`` block scores, straight to block lists
    ``(kv_indices [B, H, NQ, W], kv_counts [B, H, NQ])``: per query block the sink and local blocks, then the
    ``top_k`` best others (ties: lowest index) or, with ``mass`` < 1, the best while the estimated softmax mass of
    ``score / sqrt(head_dim)`` over the visible blocks is below ``mass``; the last query block reads every visible
    block with ``last_block_dense``.  W: every block with a dense last block, else ``top_k + sink + local`` (clipped).
    Triton: one program per row (the decode selection's search), no ``[NQ, NK]`` masks and no sort; torch:
    :func:`.reference.prefill_block_choice` and a mask-to-lists pass."""
    args = dict(q_len=q_len, block_q=block_q, block_k=block_k, kv_len=kv_len, top_k=top_k, sink_blocks=sink_blocks,
                local_blocks=local_blocks, mass=mass, head_dim=head_dim, last_block_dense=last_block_dense)
    if _prefill_on_triton(backend, scores, block_q):
        from . import triton_prefill, triton_select

        if scores.shape[-1] <= triton_select.MAX_BLOCKS:
            return triton_prefill.prefill_block_select(scores, **args, options=resolve_options(options))
    return prefill_block_select_torch(scores, **args)
