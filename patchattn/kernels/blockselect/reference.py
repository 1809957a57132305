"""Pure-torch decode-time block top-k: the CPU path of :mod:`patchattn.kernels.blockselect` and its test oracle.

One query row per (batch, head) scores every key block by ``q . mean_key(block)``, keeps the sink and local
blocks, then the best-scoring other blocks until their estimated share of the softmax mass reaches ``mass``
(at most ``top_k``), and returns the choice as ascending block lists.
"""
from __future__ import annotations

import torch

from ..blocksparse import blocks_from_mask


def within_mass(logits, allowed, forced, top_logits, mass: float) -> torch.Tensor:
    """For top blocks sorted best first, whether each is still needed to reach ``mass`` of the estimated softmax mass.

    ``logits`` ``[..., NK]`` are the blocks' scaled scores (a block's estimated mass is their softmax over the
    ``allowed`` blocks); the ``forced`` blocks count first, so rows the sink and local blocks already explain read
    few extra blocks and diffuse rows read up to the cap.
    """
    total = torch.logsumexp(logits.masked_fill(~allowed, float("-inf")), dim=-1, keepdim=True)
    forced_mass = torch.exp(logits - total).masked_fill(~forced, 0.0).sum(dim=-1, keepdim=True)
    top_mass = torch.exp(top_logits - total)
    before = forced_mass + top_mass.cumsum(dim=-1) - top_mass
    return before < mass


def forced_decode_blocks(n_k: int, sink_blocks: int, local_blocks: int, device=None) -> torch.Tensor:
    """``[NK]`` sink blocks and the ``local_blocks`` last blocks (the query sits in the last one)."""
    cols = torch.arange(n_k, device=device)
    return (cols < sink_blocks) | (cols > n_k - 1 - local_blocks)


def group_scores(q: torch.Tensor, k_means: torch.Tensor, per_head: bool, reduce: str) -> torch.Tensor:
    """``[B, H, NK]`` fp32 scores ``q . mean_key``; H = Hq with ``per_head``, else Hkv (``reduce``: the GQA group's
    ``max`` or ``mean`` score)."""
    b, hq, d = q.shape
    hkv = k_means.shape[1]
    scores = q.float().view(b, hkv, hq // hkv, 1, d) @ k_means.float()[:, :, None].transpose(-1, -2)
    scores = scores[..., 0, :]  # [B, Hkv, G, NK]
    if per_head:
        return scores.flatten(1, 2)
    return scores.amax(dim=2) if reduce == "max" else scores.mean(dim=2)


def decode_block_topk_torch(q, k_means, *, top_k: int, sink_blocks: int, local_blocks: int, mass: float,
                            per_head: bool, reduce: str, width: int):
    n_k = k_means.shape[2]
    scores = group_scores(q, k_means, per_head, reduce)
    forced = forced_decode_blocks(n_k, sink_blocks, local_blocks, q.device).expand_as(scores)
    chosen = torch.zeros_like(forced)
    k = min(top_k, n_k)
    if k > 0:
        top = scores.masked_fill(forced, float("-inf")).topk(k, dim=-1)
        keep = torch.isfinite(top.values)
        if mass < 1.0:
            root_d = q.shape[-1] ** 0.5
            allowed = torch.ones_like(forced)
            keep &= within_mass(scores / root_d, allowed, forced, top.values / root_d, mass)
        chosen.scatter_(-1, top.indices, keep)
    idx, counts = blocks_from_mask((chosen | forced)[:, :, None], width=width)
    return idx, counts


# ---------------------------------------------------------------------------------------------
# HiP's hierarchical top-k (prefill): the torch path and the oracle of triton_tree.py
# ---------------------------------------------------------------------------------------------
def initial_segments(diagonal: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[NQ, k]`` start/end (exclusive) of ``k`` near-equal segments of blocks ``[0, diagonal]``: segment ``c`` is
    ``[floor(c * n / k), floor((c + 1) * n / k))`` for ``n = diagonal + 1`` visible blocks (integer arithmetic, so
    the Triton search cuts the same segments)."""
    cuts = torch.arange(k + 1, device=diagonal.device)[None] * (diagonal.long() + 1)[:, None] // k
    return cuts[:, :-1], cuts[:, 1:]


def search_rounds(n_k: int, k: int) -> int:
    """Halvings until the longest initial segment (``ceil(n_k / k)`` blocks) is one block: known on the host, so the
    search needs no device-to-host sync."""
    longest, rounds = -(-n_k // k), 0
    while longest > 1:
        longest, rounds = -(-longest // 2), rounds + 1
    return rounds


def tree_search_torch(q_rows: torch.Tensor, k_means: torch.Tensor, diagonal: torch.Tensor, k: int,
                      score_dtype: torch.dtype | None = None) -> torch.Tensor:
    """HiP's hierarchical top-k over key blocks: start from ``k`` equal segments of each query block's causal past,
    split every segment in two, score each half by its mean key against the query block's best row, keep the ``k``
    best halves (ties: torch's top-k order; left halves listed before right ones), repeat until single blocks.

    Args:
        q_rows: ``[B, H, NQ, R, D]`` the query rows each segment is scored against (best row wins; ``R = 1``: one
            pooled row).
        k_means: ``[B, H, NK, D]`` mean key per key block.
        diagonal: ``[NQ]`` last key block each query block may read.
        k: blocks to keep.
        score_dtype: a 16-bit dtype rounds the segment means to it before the (fp32) products, as the Triton search
            does for queries of that dtype (``q_rows`` then hold values of that dtype).

    Returns:
        bool ``[B, H, NQ, NK]`` with at most ``k`` blocks per row (every visible block when there are at most ``k``).
    """
    b, h, n_q = q_rows.shape[:3]
    n_k = k_means.shape[2]
    start, end = initial_segments(diagonal, k)
    start = start.expand(b, h, n_q, k).clone()
    end = end.expand(b, h, n_q, k).clone()
    # Prefix sums of the block means give any segment's mean key in O(1): its representative.
    prefix = torch.nn.functional.pad(k_means.cumsum(dim=2, dtype=torch.float32), (0, 0, 1, 0))
    for _ in range(search_rounds(n_k, k)):
        mid = torch.where(end - start > 1, (start + end) // 2, end)
        start = torch.cat([start, mid], dim=-1)  # left halves then right halves
        end = torch.cat([mid, end], dim=-1)
        scores = segment_scores(q_rows, prefix, start, end, score_dtype)
        best = scores.topk(k, dim=-1).indices
        start, end = torch.gather(start, -1, best), torch.gather(end, -1, best)
    return segments_to_mask(start, end, n_k)


def segments_to_mask(start: torch.Tensor, end: torch.Tensor, n_k: int) -> torch.Tensor:
    """bool ``[..., NK]``: the first block of every non-empty segment.  Empty segments write to a spare column (were
    they clamped onto a real block, a scatter of ``False`` could overwrite a chosen block's ``True``)."""
    index = torch.where(end > start, start, n_k).clamp(0, n_k)
    chosen = torch.zeros(*start.shape[:-1], n_k + 1, dtype=torch.bool, device=start.device)
    chosen.scatter_(-1, index, True)
    return chosen[..., :n_k]


def segment_scores(q_rows, prefix, start, end, score_dtype=None) -> torch.Tensor:
    """``[B, H, NQ, S]`` score of each segment: best query row . the segment's mean key (-inf if empty)."""
    b, h, n_q, n_seg = start.shape
    d = prefix.shape[-1]

    def gather(index):
        return torch.gather(prefix, 2, index.reshape(b, h, -1, 1).expand(-1, -1, -1, d)).view(b, h, n_q, n_seg, d)

    length = (end - start).clamp(min=1)[..., None]
    means = (gather(end) - gather(start)) / length
    if score_dtype is not None and score_dtype != torch.float32:
        means = means.to(score_dtype).float()
    scores = (q_rows.to(means.dtype) @ means.transpose(-1, -2)).amax(dim=3)  # [B, H, NQ, R, S] -> best row
    return scores.masked_fill(end <= start, float("-inf"))
