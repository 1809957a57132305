"""Frame-aligned layouts of a DiT call for the block-sparse engine, and token-exact masks built from an element rule
evaluated once per distinct tile (radial attention, CLEAR's circular window).

Layout: the image/video tokens of each frame are padded to whole blocks (in raster order, or cut into 2D tiles of
``tile = (th, tw)`` tokens), frames one after another, then the text in its own blocks.  One block never holds two
frames, so a frame pair is a rectangle of whole blocks and a rule that depends on the frame distance and on offsets
inside the frames gives the same tile again and again: :func:`coded_tiles` evaluates the rule on one representative
per *code* (a tuple of integers naming everything the tile's content depends on) and shares the result with every
block pair of that code, so no ``T x T`` tensor and no per-pair element mask is ever built.  Padded slots are keys
nobody sees; padded query rows may see anything (their output is dropped, so their gradient is zero), which keeps
the edge tiles of a frame whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..kernels import blocksparse
from .neighborhood import check_layout
from .tiles import PermutedTokens, TiledMask, distinct_tiles

PAD, IMAGE, TEXT = 0, 1, 2
REPRESENTATIVE_CHUNK = 1 << 22  # rule elements evaluated per chunk (representatives x block x block)


@dataclass(frozen=True)
class FrameLayout:
    """Where each token of a call goes, and what sits in each slot of the permuted sequence.

    Attributes:
        grid: ``(frames, height, width)`` of the image tokens (row-major in the call: frame, row, column).
        block: tokens per block of the engine (queries and keys).
        tile: ``(th, tw)`` with ``th * tw == block`` (2D tiles), or None (each frame in raster order).
        position: ``[T]`` int64, the slot of each token of the call's sequence.
        length: slots in all (padded frames, then the text).
        kind, frame, y, x, raster: ``[length]`` int64 per slot: PAD / IMAGE / TEXT, and the image token's frame,
            row, column and raster index inside its frame (0 for text and padding).
    """

    grid: tuple[int, int, int]
    block: int
    tile: tuple[int, int] | None
    position: torch.Tensor
    length: int
    kind: torch.Tensor = field(repr=False)
    frame: torch.Tensor = field(repr=False)
    y: torch.Tensor = field(repr=False)
    x: torch.Tensor = field(repr=False)
    raster: torch.Tensor = field(repr=False)

    @property
    def n_tokens(self) -> int:
        return self.position.shape[0]

    @property
    def n_blocks(self) -> int:
        return -(-self.length // self.block)

    def block_first(self, values: torch.Tensor) -> torch.Tensor:
        """``values[first slot of each block]`` (``[n_blocks]``)."""
        return values[torch.arange(self.n_blocks) * self.block]

    def block_min(self, values: torch.Tensor, fill: int) -> torch.Tensor:
        """Per block, the smallest value over its real (non-padding) slots; ``fill`` for a block with none."""
        return self._block_reduce(values, fill, "amin")

    def block_max(self, values: torch.Tensor, fill: int) -> torch.Tensor:
        return self._block_reduce(values, fill, "amax")

    def _block_reduce(self, values, fill, how):
        real = self.kind != PAD
        blocks = torch.arange(self.length) // self.block
        out = torch.full((self.n_blocks,), fill, dtype=torch.int64)
        return out.scatter_reduce(0, blocks[real], values[real], reduce=how, include_self=False)


@dataclass(frozen=True)
class BlockStats:
    """Per block of a layout (``[n_blocks]`` int64): its kind (IMAGE or TEXT: a block never mixes them), frame,
    first slot's row / column / raster index, largest real row / column / raster index, and real slots."""

    kind: torch.Tensor
    frame: torch.Tensor
    y0: torch.Tensor
    x0: torch.Tensor
    raster0: torch.Tensor
    y1: torch.Tensor
    x1: torch.Tensor
    raster1: torch.Tensor
    count: torch.Tensor

    @classmethod
    def of(cls, layout: FrameLayout) -> BlockStats:
        real = (layout.kind != PAD).long()
        blocks = torch.arange(layout.length) // layout.block
        count = torch.zeros(layout.n_blocks, dtype=torch.int64).index_add_(0, blocks, real)
        return cls(layout.block_first(layout.kind), layout.block_first(layout.frame), layout.block_first(layout.y),
                   layout.block_first(layout.x), layout.block_first(layout.raster), layout.block_max(layout.y, 0),
                   layout.block_max(layout.x, 0), layout.block_max(layout.raster, 0), count)

    def pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(query block's value ``[NB, 1]``, key block's ``[1, NB]``)."""
        value = getattr(self, name)
        return value[:, None], value[None, :]


def frame_layout(grid, image: tuple[int, int], text: tuple[tuple[int, int], ...], block: int,
                 tile: tuple[int, int] | None = None) -> FrameLayout:
    """The layout of a call with ``grid`` image tokens at ``image`` and text at ``text`` (see the module docstring).
    ``tile=None`` keeps each frame in raster order padded to whole blocks; ``(th, tw)`` cuts each frame into tiles
    of ``th x tw`` tokens (the frame padded to whole tiles), one tile per block."""
    frames, height, width = (int(g) for g in grid)
    n_image = frames * height * width
    text = tuple(tuple(t) for t in text)
    check_layout(n_image, tuple(image), text)
    if tile is None:
        per_frame = -(-height * width // block) * block
        ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        intra = (ys * width + xs).reshape(-1)
    else:
        th, tw = tile
        if th * tw != block:
            raise ValueError(f"a tile of {tile} holds {th * tw} tokens, the block {block}")
        tiles_h, tiles_w = -(-height // th), -(-width // tw)
        per_frame = tiles_h * tiles_w * block
        ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        intra = (((ys // th) * tiles_w + xs // tw) * block + (ys % th) * tw + xs % tw).reshape(-1)
    image_slots = (torch.arange(frames)[:, None] * per_frame + intra[None]).reshape(-1)
    n_text = sum(stop - start for start, stop in text)
    length = frames * per_frame + n_text
    position = torch.empty(n_image + n_text, dtype=torch.int64)
    position[image[0]:image[1]] = image_slots
    next_slot = frames * per_frame
    for start, stop in sorted(text):
        position[start:stop] = torch.arange(next_slot, next_slot + stop - start)
        next_slot += stop - start

    kind = torch.full((length,), PAD, dtype=torch.int64)
    kind[image_slots] = IMAGE
    kind[frames * per_frame:] = TEXT
    coords = {name: torch.zeros(length, dtype=torch.int64) for name in ("frame", "y", "x", "raster")}
    f_ix = torch.arange(frames)[:, None].expand(frames, height * width).reshape(-1)
    coords["frame"][image_slots] = f_ix
    coords["y"][image_slots] = ys.reshape(-1).repeat(frames)
    coords["x"][image_slots] = xs.reshape(-1).repeat(frames)
    coords["raster"][image_slots] = (ys * width + xs).reshape(-1).repeat(frames)
    return FrameLayout((frames, height, width), block, tile, position, length, kind, **coords)


# ----------------------------------------------------------------------------------------------------------------
# Tiles from a rule, one evaluation per code
# ----------------------------------------------------------------------------------------------------------------
def coded_tiles(layout: FrameLayout, visible: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                candidates: torch.Tensor, codes: torch.Tensor, whole_blocks: bool = False) -> tuple[TiledMask, float]:
    """The TiledMask of ``visible`` over the layout's slots, and its density over the call's real token pairs.

    ``visible(q_slot [N, B, 1], k_slot [N, 1, B]) -> bool [N, B, B]``: the rule between two *real* slots (padding
    is handled here).  ``candidates``: bool ``[NB, NB]``, a superset of the block pairs with a visible pair.
    ``codes``: int64 ``[NB, NB, C]``: two candidate pairs with equal codes must have equal tiles (the rule and the
    padding of both blocks); the rule is evaluated on the first pair of each code only.
    ``whole_blocks``: a block pair with any visible pair is read whole (the rule rounded outward to blocks): only
    padded key slots stay hidden, so the only partial tiles left are those of key blocks holding padding.
    """
    block, length, n_blocks = layout.block, layout.length, layout.n_blocks
    where = candidates.nonzero()  # [n, 2] row-major
    pair_codes = codes[where[:, 0], where[:, 1]]
    inverse = _code_ids(pair_codes)
    n_codes = int(inverse.max()) + 1 if inverse.numel() else 0
    first = torch.full((n_codes,), where.shape[0], dtype=torch.int64)
    first = first.scatter_reduce(0, inverse, torch.arange(where.shape[0]), reduce="amin")
    reps = where[first]

    offsets = torch.arange(block)
    slot_kind = torch.cat([layout.kind, torch.full((block,), -1, dtype=torch.int64)])  # -1: past the sequence
    seen_parts, whole_parts, count_parts = [], [], []
    chunk = max(1, REPRESENTATIVE_CHUNK // (block * block))
    for start in range(0, n_codes, chunk):
        rq, rk = reps[start:start + chunk, 0], reps[start:start + chunk, 1]
        q_slot = rq[:, None] * block + offsets[None]  # [n, B]
        k_slot = rk[:, None] * block + offsets[None]
        q_kind, k_kind = slot_kind[q_slot], slot_kind[k_slot]
        q_real, k_real = q_kind > PAD, k_kind > PAD
        qs, ks = q_slot.clamp(max=length - 1), k_slot.clamp(max=length - 1)
        seen = visible(qs[:, :, None], ks[:, None, :]) & q_real[:, :, None] & k_real[:, None, :]
        if whole_blocks:  # any visible pair: every real key for every query (padded query rows too: dropped)
            hit = seen.any(dim=(1, 2))[:, None, None]
            seen = hit & k_real[:, None, :].expand_as(seen)
        # Whole: every real key of the tile seen by every real query (padded queries don't matter; keys past the
        # sequence are cut by its length).
        ignorable_k = (k_kind < 0)[:, None, :]
        whole = (seen | ~q_real[:, :, None] | ignorable_k).all(dim=(1, 2)) & ~(k_kind == PAD).any(1)
        seen_parts.append(seen)
        whole_parts.append(whole)
        count_parts.append((seen & q_real[:, :, None]).sum(dim=(1, 2)))  # real pairs only
    cat = (lambda parts, shape: torch.cat(parts) if parts else torch.zeros(shape, dtype=torch.bool))
    seen = cat(seen_parts, (0, block, block))
    whole = cat(whole_parts, (0,))
    counts = torch.cat(count_parts) if count_parts else torch.zeros(0, dtype=torch.int64)
    nonempty = counts > 0

    visible_pairs = int(torch.bincount(inverse, minlength=n_codes).mul(counts).sum()) if n_codes else 0
    keep = nonempty[inverse]
    listed = torch.zeros(n_blocks, n_blocks, dtype=torch.bool)
    listed[where[keep, 0], where[keep, 1]] = True
    partial_codes = nonempty & ~whole
    pool, pool_ids = distinct_tiles(seen[partial_codes])
    code_ids = torch.full((n_codes,), -1, dtype=torch.int64)
    code_ids[partial_codes] = pool_ids
    ids_grid = torch.full((n_blocks, n_blocks), -1, dtype=torch.int64)
    ids_grid[where[:, 0], where[:, 1]] = code_ids[inverse]
    kv_indices, kv_counts = blocksparse.blocks_from_mask(listed[None, None], backend="torch")
    in_count = torch.arange(kv_indices.shape[-1]) < kv_counts[..., None]
    ids = torch.gather(ids_grid[None, None], 3, kv_indices.long())
    ids = torch.where(in_count, ids, torch.full_like(ids, -1)).to(torch.int32)
    tiled = TiledMask(kv_indices, kv_counts, ids.contiguous(), pool.contiguous(), block, block, length, length)
    n_tokens = layout.n_tokens
    return tiled, visible_pairs / (n_tokens * n_tokens)


def _code_ids(codes: torch.Tensor) -> torch.Tensor:
    """Dense ids of the distinct rows of ``codes`` ``[n, C]``: the columns folded into one int64 (mixed radix) when
    that fits, a 1D unique being far faster than ``unique(dim=0)``."""
    if not codes.shape[0]:
        return torch.zeros(0, dtype=torch.int64)
    low, high = codes.amin(0), codes.amax(0)
    spans = (high - low + 1).tolist()
    if math.prod(spans) >= 1 << 62:
        return torch.unique(codes, dim=0, return_inverse=True)[1]
    key = torch.zeros(codes.shape[0], dtype=torch.int64)
    for column, span in enumerate(spans):
        key = key * span + (codes[:, column] - low[column])
    return torch.unique(key, return_inverse=True)[1]


# ----------------------------------------------------------------------------------------------------------------
# The plan a method runs
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FramePlan(PermutedTokens):
    """A call's permutation and TiledMask: ``permute`` q/k/v, run the engine, ``unpermute`` the output.

    Attributes:
        tiled: the mask over the permuted sequence.
        position: ``[T]`` int64, the slot of each token of the call.
        length: slots in all.
        density: visible (query, key) pairs of the call's tokens over ``T * T``: what the engine reads of the real
            tokens (padding excluded).
        source: ``[length]`` the token at each slot when nothing is padded (a gather permutes), else None.
        listed_tiles: (query block, key block) pairs the engine reads; ``partial_tiles``: those with an element mask
            (each pays a whole tile's matmuls plus the mask), counted on the host when the plan is built.
    """

    tiled: TiledMask
    position: torch.Tensor
    length: int
    density: float
    source: torch.Tensor | None = field(default=None, repr=False)
    listed_tiles: int = 0
    partial_tiles: int = 0

    @classmethod
    def of(cls, layout: FrameLayout, tiled: TiledMask, density: float, device=None) -> FramePlan:
        position = layout.position.to(device)
        source = torch.argsort(layout.position).to(device) if layout.length == layout.n_tokens else None
        listed, partial = tiled.tile_counts()
        return cls(tiled.to(device) if device is not None else tiled, position, layout.length, density, source,
                   listed, partial)


def square_tile(block: int, height: int, width: int) -> tuple[int, int]:
    """A ``th x tw`` tile of ``block`` tokens (a power of two), as square as the block allows, narrower than the
    grid where the grid is small (so a thin grid is not padded to a square)."""
    if block < 1 or block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")
    th = 1 << (block.bit_length() - 1) // 2
    th = min(th, 1 << max(0, (height - 1).bit_length()))
    tw = block // th
    if tw > 1 << max(0, (width - 1).bit_length()):  # a narrow grid: taller tiles instead
        tw = min(block, 1 << max(0, (width - 1).bit_length()))
        th = block // tw
    return th, tw


__all__ = ["FrameLayout", "FramePlan", "coded_tiles", "frame_layout", "square_tile"]
