"""Content-routed tiles on a DiT's latent grid: BiFormer's region-to-region routing (and MoBA's gate, non-causal) on
the block-sparse engine -- the DiT path of ``blocktopk``.

The grid is cut into tiles of one engine block (2D tiles such as 8x8, 3D such as 4x4x4: the token permutation of
``masks/neighborhood.py`` with a window covering the grid, so tiles holding grid padding are partial tiles).  Each image
query tile scores every image key tile by its mean-pooled query . mean-pooled key (BiFormer's region affinity, the
per-head mean of the real tokens of each tile) and keeps its own tile plus the best ``top_k`` others, stopping early
once their estimated share of the softmax mass reaches ``mass``; text tokens of joint-attention models are read by
every image query and attend to everything themselves (as ``gna``'s additional KV).  Lists are per (batch, head), one
engine call per attention call; selection stays on the device (no host read).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..kernels.blocksparse import block_sparse_attention
from ..masks.neighborhood import NeighborhoodPlan, neighborhood_plan
from ._dit import DiTCall, key_bias_in_order

PLAN_CACHE = 32


@dataclass(frozen=True)
class RoutingPlan:
    """A grid's tiles for routing: the covering plan, the real tokens of each image tile, the image tile count."""

    plan: NeighborhoodPlan
    counts: torch.Tensor  # [n_image_tiles] float
    n_image_tiles: int


@lru_cache(maxsize=PLAN_CACHE)
def covering_plan(grid: tuple[int, int, int], block: int, image, text, device: str) -> NeighborhoodPlan:
    """Every tile of the grid listed for every query tile (text after): the permutation, the tile pool for the
    grid's padding and the dense lists that routing picks entries from."""
    return neighborhood_plan(grid, grid, 1, 1, False, block=block, image=image, text=text,
                             device=torch.device(device))


@torch.compiler.disable  # host-side plan building, once per (grid, layout, device); a compiled call finds it cached
def _routing_plan(grid, block: int, image, text, device: str) -> RoutingPlan:
    plan = covering_plan(grid, block, image, text, device)
    size = plan.tiled.block_q
    n_text = sum(stop - start for start, stop in text)
    n_image_tiles = (plan.length - n_text) // size
    slots = plan.position[image[0]:image[1]]
    counts = torch.bincount(slots // size, minlength=n_image_tiles).float()  # real tokens per tile (not padding)
    return RoutingPlan(plan, counts, n_image_tiles)


def routing_plan(plans: dict, call: DiTCall, block: int, device) -> RoutingPlan:
    """This call's routing plan from the module's own ``plans`` (traced as a dict lookup), built once."""
    key = (call.grid, block, call.image, call.text, str(device))
    if key not in plans:
        plans[key] = _routing_plan(*key)
    return plans[key]


def pooled_tiles(x: torch.Tensor, n_tiles: int, size: int, counts: torch.Tensor) -> torch.Tensor:
    """``[B, H, n_tiles, D]`` mean of the real tokens of each image tile (padding slots are zeros after permute)."""
    b, h, _, d = x.shape
    sums = x[:, :, :n_tiles * size].float().view(b, h, n_tiles, size, d).sum(3)
    return sums / counts.clamp(min=1)[:, None]


def routed_tiles(q_means, k_means, counts, top_k: int, mass: float, scale: float) -> torch.Tensor:
    """bool ``[B, H, NI, NI]``: the image key tiles each image query tile reads (its own always).

    Keys are ranked by pooled score; the estimated softmax share of tile j is ``count_j * exp(s_ij)`` normalised
    over the row (the tile's tokens all taken at the pooled score).  Kept: the own tile and the best tiles while the
    share before them is below ``mass``, at most ``top_k`` besides the own tile.
    """
    n = q_means.shape[2]
    scores = (q_means @ k_means.transpose(-1, -2)) * scale + counts.clamp(min=1).log()
    own = torch.eye(n, dtype=torch.bool, device=scores.device)
    ranked = scores.masked_fill(own, float("-inf"))
    order = ranked.argsort(dim=-1, descending=True)
    share = torch.softmax(scores, dim=-1)
    own_share = share.diagonal(dim1=-2, dim2=-1)[..., None]
    before = own_share + torch.cumsum(share.gather(-1, order), -1) - share.gather(-1, order)
    rank = torch.arange(n, device=scores.device)
    keep_sorted = (rank < min(top_k, n - 1)) & (before < mass)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep | own


def routed_lists(plan: NeighborhoodPlan, keep_image: torch.Tensor, n_image_tiles: int):
    """Engine lists ``[B, H, NQ, W]`` (indices, counts, tile ids): the covering plan's entries that ``keep_image``
    keeps for image query tiles (text key blocks always), every entry for text query blocks."""
    tiled = plan.tiled
    idx, cnt, ids = tiled.kv_indices[0, 0], tiled.kv_counts[0, 0], tiled.tile_mask_ids[0, 0]  # [NQ, W], [NQ]
    b, h = keep_image.shape[:2]
    n_q, width = idx.shape
    listed = torch.arange(width, device=idx.device)[None] < cnt[:, None]  # [NQ, W]
    keep = listed.expand(b, h, n_q, width).clone()
    # Image query rows list image key tiles 0..NI-1 first, in order (the window covers the grid), then the text.
    keep[:, :, :n_image_tiles, :n_image_tiles] = keep_image
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)
    counts = keep.sum(-1, dtype=torch.int32)
    indices = idx.expand(b, h, n_q, width).gather(-1, order)
    tile_ids = ids.expand(b, h, n_q, width).gather(-1, order)
    tile_ids = torch.where(torch.arange(width, device=idx.device) < counts[..., None], tile_ids, -1)
    return indices.contiguous(), counts, tile_ids.to(torch.int32).contiguous()


def routed_density(keep_image: torch.Tensor, counts: torch.Tensor, n_text: int) -> torch.Tensor:
    """Visible token pairs over ``T * T`` (a 0-d tensor: no host read)."""
    n_image = counts.sum()
    total = n_image + n_text
    image_rows = ((keep_image.float() @ counts) * counts).sum((-1,)).mean() + n_image * n_text
    return (image_rows + n_text * total) / (total * total)


def routed_tile_attention(query, key, value, attention_mask, call: DiTCall, *, plans: dict, top_k: int, mass: float,
                          block: int, scaling, backend: str, record):
    """One self/joint DiT attention call through routed tiles: ``[B, T, H, D]`` like the model's SDPA call, or None
    when the settings read every tile (the dense-equivalent setting)."""
    routing = routing_plan(plans, call, block, query.device)
    plan, counts, n_image_tiles = routing.plan, routing.counts, routing.n_image_tiles
    size = plan.tiled.block_q
    if top_k >= n_image_tiles - 1 and mass >= 1.0:
        return None  # every tile is read: the caller runs the model's own attention (exact)
    q, k, v = plan.permute(query), plan.permute(key), plan.permute(value)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    k_means = pooled_tiles(k, n_image_tiles, size, counts)
    if k_means.shape[1] != q.shape[1]:  # GQA: each query head scores its group's keys
        k_means = k_means.repeat_interleave(q.shape[1] // k_means.shape[1], dim=1)
    keep = routed_tiles(pooled_tiles(q, n_image_tiles, size, counts), k_means, counts, top_k, mass, scale)
    record(density=routed_density(keep, counts, call.n_text))
    indices, kv_counts, tile_ids = routed_lists(plan, keep, n_image_tiles)
    bias = None
    if attention_mask is not None:
        bias = key_bias_in_order(attention_mask, query.shape[1], plan.length, plan.position)
        if bias is None:
            raise NotImplementedError("blocktopk on a DiT supports key-padding masks ([B, 1, 1, T]) only; this call's "
                                      f"mask has shape {tuple(attention_mask.shape)}")
    out = block_sparse_attention(q, k, v, indices, kv_counts, block_q=size, block_k=size, causal=False, scale=scaling,
                                 col_bias=bias, tile_masks=plan.tiled.tile_masks, tile_mask_ids=tile_ids,
                                 backend=backend)
    return plan.unpermute(out).transpose(1, 2)
