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
