"""Neighborhood attention (NATTEN's NA and GNA, HaloNet's blocked local attention) on a 1D/2D/3D token grid, as the
block lists and partial tiles of the block-sparse engine.

The definition, per axis of the grid (frames, height, width), for a query at coordinate ``q`` and a key at ``k`` of
an axis of ``L`` tokens, with ``window`` K, ``stride`` s, ``dilation`` d and ``causal`` (NATTEN's semantics):

- dilation splits the axis into d interleaved groups (``x % d``); a query sees keys of its own group only, and the
  rest is plain NA on the group's ``n = ceil((L - g) / d)`` tokens at coordinates ``x // d``;
- stride groups the (in-group) queries in runs of s that share one window, the window of the run's *leader*:
  the run's middle query (``start + s // 2``; the right one of the two when s is even) or, causal, its last query;
  both clamped to the last query of the group.  s = 1 is the sliding window, s = K blocked (Swin, HaloNet's blocks
  when K > s: a block plus a halo);
- non-causal: the window covers ``K // 2`` keys left of the leader, the leader and ``(K - 1) // 2`` keys right of it
  (an even K = 2r: r left, r - 1 right), shifted, never shrunk, to stay inside the group (NATTEN's clamping);
- causal: the keys ``k <= q`` whose distance to the leader is below K (the window ends at the query and shrinks at
  the start of the axis, as NATTEN's causal NA does);
- a window at least as large as the group covers it (NATTEN refuses ``K * d > L``; here it is the whole axis).

A token pair is visible when it is on every axis.  ``neighborhood_token_mask`` writes that down token by token (the
test oracle, small grids only).  ``neighborhood_plan`` builds the same mask for large grids without any ``T x T``
tensor: the grid's tokens are permuted into tile order (tiles of ``tile`` tokens per axis, e.g. 8x8 or 4x4x4, one
tile = one query/key block of the engine; within each axis, dilation groups are made contiguous first, so a dilated
neighborhood is contiguous too), the grid is padded to whole tiles (padded keys are never visible), and each query
tile's key tiles are found per axis by interval arithmetic: along one axis a query's visible keys form one interval
of the permuted axis, so a (query tile, key tile) pair is empty, full or partial per axis, and the pair of 2D/3D
tiles is the product of its axes.  Element masks are built for partial pairs only, and identical ones are stored
once.  The tile shape is chosen (``tile=None``) to minimise the work: listed tiles, partial ones counted 1.5x.

Text tokens (joint attention of FLUX, SD3, CogVideoX) follow NATTEN's "additional KV": text queries see every
token, and every image query also sees every text token.  The text goes after the image tiles in the permuted
sequence, in its own blocks: whole (-1) for every query block, its ragged last block cut by the sequence length (the
engine's ``k_len``), so the whole joint attention is one engine call (no second dense call and log-sum-exp merge).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from .tiles import PermutedTokens, TiledMask

AXES = 3
GRANULARITIES = ("token", "tile")
PARTIAL_COST = 1.5  # a partial tile loads its mask and takes the masked branch: counted as 1.5 whole tiles


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Neighborhood:
    """NA settings per axis of a ``(frames, height, width)`` grid (see the module docstring)."""

    grid: tuple[int, int, int]
    window: tuple[int, int, int]
    stride: tuple[int, int, int] = (1, 1, 1)
    dilation: tuple[int, int, int] = (1, 1, 1)
    causal: tuple[bool, bool, bool] = (False, False, False)

    @classmethod
    def of(cls, grid, window, stride=1, dilation=1, causal=False) -> Neighborhood:
        """From a 1D/2D/3D grid and per-axis values (an int / bool for every axis, or one per axis of the grid)."""
        grid = tuple(int(g) for g in (grid if isinstance(grid, (tuple, list)) else (grid,)))
        if not 1 <= len(grid) <= AXES or any(g < 1 for g in grid):
            raise ValueError(f"grid must be 1 to 3 positive extents, got {grid}")
        dims = len(grid)
        hood = cls(
            grid=_leading(grid, dims, 1, "grid"), window=_leading(window, dims, 1, "window"),
            stride=_leading(stride, dims, 1, "stride"), dilation=_leading(dilation, dims, 1, "dilation"),
            causal=tuple(bool(c) for c in _leading(causal, dims, False, "causal")),
        )
        hood.check()
        return hood

    def check(self) -> None:
        for name in ("window", "stride", "dilation"):
            values = getattr(self, name)
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"neighborhood {name} must be positive integers, got {values}")
        if any(s > w for s, w in zip(self.stride, self.window)):
            raise ValueError(f"neighborhood stride {self.stride} must not exceed the window {self.window} on any axis "
                             "(NATTEN's rule: queries of one stride group must all be inside their shared window)")

    def covers_everything(self) -> bool:
        """True when every query sees every key: no causal axis, no dilation, windows at least the grid."""
        return all(length == 1 or (not causal and dilation == 1 and window >= length)
                   for length, window, dilation, causal in zip(self.grid, self.window, self.dilation, self.causal))

    def axis(self, a: int) -> tuple[int, int, int, int, bool]:
        return self.grid[a], self.window[a], self.stride[a], self.dilation[a], self.causal[a]


def _leading(value, dims: int, pad, name: str) -> tuple:
    """``value`` (one for all axes, or one per axis of a ``dims``-D grid) as a 3-tuple, trivial leading axes first."""
    if isinstance(value, (tuple, list)):
        if len(value) == AXES:
            return tuple(value)
        if len(value) != dims:
            raise ValueError(f"neighborhood {name} {tuple(value)} must have one value per grid axis ({dims})")
        return (pad,) * (AXES - dims) + tuple(value)
    return (pad,) * (AXES - dims) + (value,) * dims


# ----------------------------------------------------------------------------------------------------------------
# The definition, token by token (the oracle)
# ----------------------------------------------------------------------------------------------------------------
def axis_sees(q: int, k: int, length: int, window: int, stride: int, dilation: int, causal: bool) -> bool:
    """Whether the query at coordinate ``q`` sees the key at ``k`` along one axis (the module docstring's rule)."""
    group = q % dilation
    if k % dilation != group:
        return False
    n = len(range(group, length, dilation))
    qi, ki, kernel = q // dilation, k // dilation, min(window, n)
    if causal:
        leader = min(qi // stride * stride + stride - 1, n - 1)
        return ki <= qi and leader - ki < kernel
    leader = min(qi // stride * stride + stride // 2, n - 1)
    left, right = kernel // 2, (kernel - 1) // 2
    center = min(max(leader, left), n - 1 - right)
    return center - left <= ki <= center + right


def neighborhood_token_mask(grid, window, stride=1, dilation=1, causal=False) -> torch.Tensor:
    """bool ``[N, N]`` over the grid's tokens in row-major order: query i sees key j.  Token by token, straight from
    the definition: for small grids (tests), never for a real model's grid."""
    hood = Neighborhood.of(grid, window, stride, dilation, causal)
    coords = list(itertools.product(*(range(g) for g in hood.grid)))
    seen = [[all(axis_sees(q[a], k[a], *hood.axis(a)) for a in range(AXES)) for k in coords] for q in coords]
    return torch.tensor(seen, dtype=torch.bool).reshape(len(coords), len(coords))


def with_text(image_mask: torch.Tensor, length: int, image: tuple[int, int],
              text: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """A joint sequence's token mask ``[length, length]``: ``image_mask`` on the image span; text queries see every
    token and every query sees the text (NATTEN's additional KV)."""
    mask = torch.zeros(length, length, dtype=torch.bool)
    mask[image[0]:image[1], image[0]:image[1]] = image_mask
    for start, stop in text:
        mask[start:stop, :] = True
        mask[:, start:stop] = True
    return mask


# ----------------------------------------------------------------------------------------------------------------
# One axis, as intervals of the permuted axis
# ----------------------------------------------------------------------------------------------------------------
def axis_order(length: int, dilation: int) -> torch.Tensor:
    """Coordinates of the axis in permuted order: dilation groups one after another (``[L]`` int64)."""
    return torch.cat([torch.arange(g, length, dilation) for g in range(min(dilation, length))])


def axis_intervals(length: int, window: int, stride: int, dilation: int, causal: bool) -> tuple[torch.Tensor, ...]:
    """Per query at permuted position r (``[L]``), its visible keys as permuted positions ``[lo[r], hi[r]]``."""
    x = axis_order(length, dilation)
    group, qi = x % dilation, x // dilation
    sizes = torch.tensor([len(range(g, length, dilation)) for g in range(dilation)])
    n = sizes[group]
    offset = (torch.cumsum(sizes, 0) - sizes)[group]
    kernel = torch.clamp(n, max=window)
    if causal:
        leader = torch.minimum(qi // stride * stride + stride - 1, n - 1)
        lo, hi = torch.clamp(leader - kernel + 1, min=0), qi
    else:
        leader = torch.minimum(qi // stride * stride + stride // 2, n - 1)
        left, right = kernel // 2, (kernel - 1) // 2
        center = torch.minimum(torch.maximum(leader, left), n - 1 - right)
        lo, hi = center - left, center + right
    return offset + lo, offset + hi


@dataclass(frozen=True)
class AxisTiles:
    """One axis cut into tiles of ``tile`` permuted positions: per query tile, the key tiles it touches.

    Attributes:
        keys: ``[nt, K]`` key tile ids per query tile (ascending; past ``counts`` unused).
        counts: ``[nt]``.
        pattern: ``[nt, K]`` id of the ``[tile, tile]`` element block (``patterns[id]``); 0 is the all-true block.
        full: ``[nt, K]`` True where the block is all-true.
        patterns: bool ``[n_patterns, tile, tile]``, distinct blocks of this axis.
        valid_pattern: ``[nt]`` pattern id of each key tile seen by a query that sees the whole axis (text queries):
            all-true but where the tile holds padding.
    """

    length: int
    tile: int
    keys: torch.Tensor
    counts: torch.Tensor
    pattern: torch.Tensor
    full: torch.Tensor
    patterns: torch.Tensor
    valid_pattern: torch.Tensor

    @property
    def n_tiles(self) -> int:
        return self.counts.shape[0]


@lru_cache(maxsize=256)
def axis_tiles(length: int, window: int, stride: int, dilation: int, causal: bool, tile: int,
               whole: bool = False) -> AxisTiles:
    """Classify every (query tile, key tile) pair of one axis as empty / full / partial, without an ``L x L`` mask.
    ``whole``: every touched pair is full (the neighborhoods rounded outward to tiles) but where the key tile holds
    padding, which stays hidden."""
    n_tiles = -(-length // tile)
    padded = n_tiles * tile
    lo, hi = axis_intervals(length, window, stride, dilation, causal)
    # Padded query positions repeat the last real row, so they never turn a full or empty pair partial.
    lo = torch.cat([lo, lo[-1:].expand(padded - length)])
    hi = torch.cat([hi, hi[-1:].expand(padded - length)])
    real = torch.arange(padded) < length
    lo_t, hi_t = lo.view(n_tiles, tile), hi.view(n_tiles, tile)
    touched = _touched_tiles(lo, hi, tile, n_tiles)
    starts = torch.arange(n_tiles) * tile
    ends = torch.clamp(starts + tile - 1, max=length - 1)
    inside = starts + tile <= length  # key tiles without padding
    if whole:
        full = touched & inside[None]
    else:
        full = (lo_t.max(1).values[:, None] <= starts[None]) & (hi_t.min(1).values[:, None] >= ends[None]) & inside[None]

    counts = touched.sum(1)
    width = max(1, int(counts.max()))
    keys = torch.argsort((~touched).to(torch.int8), dim=1, stable=True)[:, :width]
    key_full = torch.gather(full, 1, keys)

    # Element blocks of the partial pairs, and the padding-only blocks of whole-axis queries.
    q_tiles, slots = torch.nonzero((torch.arange(width)[None] < counts[:, None]) & ~key_full, as_tuple=True)
    k_tiles = keys[q_tiles, slots]
    cols = starts[k_tiles][:, None, None] + torch.arange(tile)[None, None]
    blocks = (cols >= lo_t[q_tiles][:, :, None]) & (cols <= hi_t[q_tiles][:, :, None]) & real[cols]
    if whole:  # only padded keys hidden: every row sees the tile's real keys
        blocks = real[cols].expand(-1, tile, tile)
    valid_blocks = real.view(n_tiles, 1, tile).expand(n_tiles, tile, tile)
    every = torch.cat([torch.ones(1, tile, tile, dtype=torch.bool), blocks, valid_blocks])
    patterns, ids = torch.unique(every.flatten(1), dim=0, return_inverse=True)
    patterns = patterns.view(-1, tile, tile)
    # Put the all-true block first (id 0): full pairs point at it.
    order = torch.argsort((ids[0] != torch.arange(patterns.shape[0])).to(torch.int8), stable=True)
    rank = torch.argsort(order)
    patterns, ids = patterns[order], rank[ids]
    pattern = torch.zeros_like(keys)
    pattern[q_tiles, slots] = ids[1:1 + len(q_tiles)]
    return AxisTiles(length, tile, keys, counts, pattern, key_full, patterns, ids[1 + len(q_tiles):])


def _touched_tiles(lo: torch.Tensor, hi: torch.Tensor, tile: int, n_tiles: int) -> torch.Tensor:
    """bool ``[nt, nt]``: query tile i has a row whose interval meets key tile j (difference array per query tile)."""
    rows = torch.arange(lo.shape[0]) // tile
    empty = lo > hi
    first, last = lo.div(tile, rounding_mode="floor"), hi.div(tile, rounding_mode="floor")
    marks = torch.zeros(n_tiles, n_tiles + 1, dtype=torch.int64)
    marks.index_put_((rows[~empty], first[~empty]), torch.ones(int((~empty).sum()), dtype=torch.int64),
                     accumulate=True)
    marks.index_put_((rows[~empty], last[~empty] + 1), -torch.ones(int((~empty).sum()), dtype=torch.int64),
                     accumulate=True)
    return torch.cumsum(marks, 1)[:, :n_tiles] > 0


# ----------------------------------------------------------------------------------------------------------------
# Tile shape
# ----------------------------------------------------------------------------------------------------------------
def tile_shapes(grid: tuple[int, int, int], block: int) -> list[tuple[int, int, int]]:
    """Candidate tiles of ``block`` tokens: powers of two per axis, 1 on axes of extent 1 (up to the next power of
    two of each extent where the grid is large enough to fill a tile that way)."""
    if block < 1 or block & (block - 1):
        raise ValueError(f"tile size must be a power of two, got {block}")
    powers = [1 << p for p in range(block.bit_length())]
    live = [g > 1 for g in grid]
    if not any(live):
        live[-1] = True
    shapes = [s for s in itertools.product(*([1] if not on else powers for on in live)) if math.prod(s) == block]
    snug = [s for s in shapes if all(t <= 1 << max(0, (g - 1).bit_length()) for t, g in zip(s, grid))]
    return snug or shapes


def tile_cost(hood: Neighborhood, tile: tuple[int, int, int], whole: bool = False) -> tuple[float, int, int]:
    """(cost, listed tile pairs, partial tile pairs) of the image grid cut into ``tile``: each count is the product
    over axes of the per-axis sums, since a tile pair is listed (full) when it is on every axis."""
    axes = [axis_tiles(*hood.axis(a), tile[a], whole) for a in range(AXES)]
    listed = math.prod(int(ax.counts.sum()) for ax in axes)
    whole = math.prod(int(ax.full.sum()) for ax in axes)
    return listed + (PARTIAL_COST - 1) * (listed - whole), listed, listed - whole


def choose_tile(hood: Neighborhood, block: int, whole: bool = False) -> tuple[int, int, int]:
    """The candidate tile of ``block`` tokens with the least work (``tile_cost``)."""
    return min(tile_shapes(hood.grid, block), key=lambda tile: tile_cost(hood, tile, whole)[0])


# ----------------------------------------------------------------------------------------------------------------
# The plan: permutation + TiledMask
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NeighborhoodPlan(PermutedTokens):
    """Everything one attention call needs: where each token goes, and the engine's lists and tiles.

    Attributes:
        tiled: the mask over the permuted sequence (image tiles, then the text).
        position: ``[T]`` int64, the permuted position of each token of the call's sequence.
        length: permuted sequence length (the padded image grid plus the text).
        tile: tokens per axis of one tile (frames, height, width).
        partial_tiles: listed (query block, key block) pairs with an element mask.
        listed_tiles: every listed pair; ``distinct_tiles``: element masks stored (after dedup).
        density: visible token pairs over ``T * T`` (the exact sparsity of the attention).
        source: ``[length]``, the token at each permuted position when nothing is padded (a gather permutes), else
            None (padded slots: zeros, then a scatter).
    """

    tiled: TiledMask
    position: torch.Tensor
    length: int
    tile: tuple[int, int, int]
    partial_tiles: int
    listed_tiles: int
    distinct_tiles: int
    density: float
    hood: Neighborhood = field(repr=False)
    source: torch.Tensor | None = field(default=None, repr=False)


def neighborhood_plan(grid, window, stride=1, dilation=1, causal=False, *, tile=None, block: int = 64,
                      image: tuple[int, int] | None = None, text: tuple[tuple[int, int], ...] = (),
                      granularity: str = "token", device=None) -> NeighborhoodPlan:
    """The engine's lists for NA on ``grid`` (1D/2D/3D), with text tokens as additional KV, without a ``T x T`` tensor.

    ``image``: ``(start, stop)`` of the grid's tokens (row-major) in the call's sequence, default ``(0, N)``;
    ``text``: ``(start, stop)`` ranges of text tokens (every other token of the sequence must be in one of them).
    ``tile``: tokens per axis of one tile (one per grid axis, or 3), product a power of two; None: the cheapest of
    ``block`` tokens (``choose_tile``).  Blocks of the engine are ``prod(tile)`` tokens, queries and keys alike.
    ``granularity``: ``"token"`` (the definition exactly) or ``"tile"`` (each query tile reads every key tile its
    neighborhoods touch, whole: HaloNet-style blocked local attention; only padded keys stay hidden).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"neighborhood granularity: got {granularity!r}; allowed: {', '.join(GRANULARITIES)}")
    whole = granularity == "tile"
    hood = Neighborhood.of(grid, window, stride, dilation, causal)
    n_image = math.prod(hood.grid)
    image = (0, n_image) if image is None else tuple(image)
    text = tuple(tuple(t) for t in text)
    check_layout(n_image, image, text)
    tile = choose_tile(hood, block, whole) if tile is None else _leading(tile, len(grid) if isinstance(grid, (tuple, list))
                                                                  else 1, 1, "tile")
    size = math.prod(tile)
    if size & (size - 1):
        raise ValueError(f"a tile of {tile} holds {size} tokens: tiles must hold a power of two")
    axes = [axis_tiles(*hood.axis(a), tile[a], whole) for a in range(AXES)]
    image_lists = _image_lists(axes)
    n_text = sum(stop - start for start, stop in text)
    n_image_blocks = math.prod(ax.n_tiles for ax in axes)
    length = n_image_blocks * size + n_text
    keys, counts, codes, full = _with_text(image_lists, axes, n_image_blocks, -(-n_text // size))
    listed = torch.arange(keys.shape[1])[None] < counts[:, None]
    ids, tile_masks = _tile_pool(codes, ~full & listed, axes)
    tiled = TiledMask(
        kv_indices=keys[None, None].to(torch.int32).to(device), kv_counts=counts[None, None].to(torch.int32).to(device),
        tile_mask_ids=ids[None, None].to(torch.int32).to(device), tile_masks=tile_masks.to(device),
        block_q=size, block_k=size, q_len=length, k_len=length,
    )
    position = _positions(hood, axes, tile, image, text, n_image_blocks * size).to(device)
    source = torch.argsort(position).to(device) if length == position.shape[0] else None
    return NeighborhoodPlan(tiled, position, length, tuple(tile), int((ids >= 0).sum()), int(counts.sum()),
                            tile_masks.shape[0], _density(hood, n_image, n_text, axes if whole else None), hood,
                            source)


def check_layout(n_image: int, image, text) -> None:
    """ValueError unless the image span holds the grid and image + text spans tile the sequence from 0."""
    if image[1] - image[0] != n_image:
        raise ValueError(f"image span {image} holds {image[1] - image[0]} tokens, the grid {n_image}")
    spans = sorted([image, *text])
    if spans[0][0] != 0 or any(a[1] != b[0] for a, b in itertools.pairwise(spans)):
        raise ValueError(f"image {image} and text {text} must cover the sequence from 0 without gaps or overlaps")


def _image_lists(axes: list[AxisTiles]):
    """Per image query tile, its key tiles (the product of the per-axis lists), compacted: (keys, counts, codes,
    full) with ``codes`` the per-axis pattern ids folded into one number."""
    f, h, w = axes
    nt = [ax.n_tiles for ax in axes]
    n_pat = [ax.patterns.shape[0] for ax in axes]

    def spread(t, a):  # [nt_a, K_a] -> broadcastable over [ntf, nth, ntw, Kf, Kh, Kw]
        shape = [1] * 6
        shape[a], shape[3 + a] = t.shape
        return t.view(shape)

    key = (spread(f.keys, 0) * nt[1] + spread(h.keys, 1)) * nt[2] + spread(w.keys, 2)
    code = (spread(f.pattern, 0) * n_pat[1] + spread(h.pattern, 1)) * n_pat[2] + spread(w.pattern, 2)
    full = spread(f.full, 0) & spread(h.full, 1) & spread(w.full, 2)
    valid = [torch.arange(ax.keys.shape[1])[None] < ax.counts[:, None] for ax in axes]
    valid = spread(valid[0], 0) & spread(valid[1], 1) & spread(valid[2], 2)
    n_q = math.prod(nt)
    flat = [t.expand(valid.shape).reshape(n_q, -1) for t in (key, code, full, valid)]
    return _compact(*flat)


def _compact(keys, codes, full, valid):
    """Listed entries first, in their (ascending) order: (keys, counts, codes, full), width = the longest row."""
    counts = valid.sum(1)
    width = max(1, int(counts.max()))
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :width]
    return keys.gather(1, order), counts, codes.gather(1, order), full.gather(1, order)


def _with_text(image_lists, axes: list[AxisTiles], n_image_blocks: int, n_text_blocks: int):
    """Append the text: image query tiles see every text block; text query blocks see every block."""
    keys, counts, codes, full = image_lists
    if n_text_blocks == 0:
        return keys, counts, codes, full
    text_keys = torch.arange(n_image_blocks, n_image_blocks + n_text_blocks)
    n_q = keys.shape[0]
    slot = torch.arange(keys.shape[1])[None]
    image_rows = (
        torch.cat([keys, text_keys.expand(n_q, -1)], 1),
        torch.cat([codes, torch.zeros(n_q, n_text_blocks, dtype=codes.dtype)], 1),
        torch.cat([full, torch.ones(n_q, n_text_blocks, dtype=torch.bool)], 1),
        torch.cat([slot < counts[:, None], torch.ones(n_q, n_text_blocks, dtype=torch.bool)], 1),
    )
    # Text queries see the whole image axis by axis: only tiles holding padding are partial.
    n_pat = [ax.patterns.shape[0] for ax in axes]
    vf, vh, vw = (ax.valid_pattern for ax in axes)
    whole_code = ((vf[:, None, None] * n_pat[1] + vh[None, :, None]) * n_pat[2] + vw[None, None, :]).reshape(-1)
    whole_full = (whole_code == 0)
    row_keys = torch.arange(n_image_blocks + n_text_blocks)
    row_codes = torch.cat([whole_code, torch.zeros(n_text_blocks, dtype=whole_code.dtype)])
    row_full = torch.cat([whole_full, torch.ones(n_text_blocks, dtype=torch.bool)])
    width = max(image_rows[0].shape[1], row_keys.shape[0])

    def pad(t, fill):
        return torch.cat([t, t.new_full((t.shape[0], width - t.shape[1]), fill)], 1)

    keys = torch.cat([pad(image_rows[0], 0), pad(row_keys.expand(n_text_blocks, -1), 0)])
    codes = torch.cat([pad(image_rows[1], 0), pad(row_codes.expand(n_text_blocks, -1), 0)])
    full = torch.cat([pad(image_rows[2], True), pad(row_full.expand(n_text_blocks, -1), True)])
    valid = torch.cat([pad(image_rows[3], False), pad(torch.ones(n_text_blocks, row_keys.shape[0],
                                                                 dtype=torch.bool), False)])
    return _compact(keys, codes, full, valid)


def _tile_pool(codes, partial, axes: list[AxisTiles]):
    """Element masks of the ``partial`` entries, each distinct one once: (ids ``[NQ, K]``, -1 for whole blocks and
    unused slots, masks bool ``[P, block, block]``)."""
    used, inverse = torch.unique(codes[partial], return_inverse=True)
    ids = torch.full_like(codes, -1)
    ids[partial] = inverse
    n_pat = [ax.patterns.shape[0] for ax in axes]
    pf, rest = used // (n_pat[1] * n_pat[2]), used % (n_pat[1] * n_pat[2])
    ph, pw = rest // n_pat[2], rest % n_pat[2]
    a, b, c = axes[0].patterns[pf], axes[1].patterns[ph], axes[2].patterns[pw]
    masks = a[:, :, None, None, :, None, None] & b[:, None, :, None, None, :, None] & c[:, None, None, :, None, None, :]
    size = math.prod(ax.tile for ax in axes)
    return ids, masks.reshape(-1, size, size)


def _positions(hood: Neighborhood, axes: list[AxisTiles], tile, image, text, n_image_slots: int) -> torch.Tensor:
    """``[T]``: the permuted position of each token of the call's sequence (image tokens in tile order, text after)."""
    ranks = [torch.argsort(axis_order(g, d)) for g, d in zip(hood.grid, hood.dilation)]  # coordinate -> permuted
    coords = torch.meshgrid(*(torch.arange(g) for g in hood.grid), indexing="ij")
    place = [ranks[a][coords[a].reshape(-1)] for a in range(AXES)]
    tiles = [(p // t, p % t) for p, t in zip(place, tile)]
    tile_id = (tiles[0][0] * axes[1].n_tiles + tiles[1][0]) * axes[2].n_tiles + tiles[2][0]
    offset = (tiles[0][1] * tile[1] + tiles[1][1]) * tile[2] + tiles[2][1]
    image_positions = tile_id * math.prod(tile) + offset
    total = (image[1] - image[0]) + sum(stop - start for start, stop in text)
    position = torch.empty(total, dtype=torch.int64)
    position[image[0]:image[1]] = image_positions
    next_slot = n_image_slots
    for start, stop in sorted(text):
        position[start:stop] = torch.arange(next_slot, next_slot + stop - start)
        next_slot += stop - start
    return position


def _density(hood: Neighborhood, n_image: int, n_text: int, whole_axes: list[AxisTiles] | None = None) -> float:
    """Visible token pairs over all pairs: per axis, each query's interval length (the grid mask is their product);
    with ``whole_axes`` (tile granularity), each touched tile pair's real rows times real columns."""
    visible = 1
    for a in range(AXES):
        if whole_axes is not None:
            visible *= _whole_pairs(whole_axes[a])
            continue
        lo, hi = axis_intervals(*hood.axis(a))
        visible *= int((hi - lo + 1).clamp(min=0).sum())
    total = n_image + n_text
    return (visible + n_text * total + n_image * n_text) / (total * total)


def _whole_pairs(ax: AxisTiles) -> int:
    """Visible pairs of one axis read tile by tile: real positions of the query tile times those of each key tile."""
    real = (ax.length - torch.arange(ax.n_tiles) * ax.tile).clamp(0, ax.tile)
    listed = torch.arange(ax.keys.shape[1])[None] < ax.counts[:, None]
    return int((real[:, None] * torch.where(listed, real[ax.keys], 0)).sum())
