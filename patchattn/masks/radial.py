"""Radial Attention's static mask (Li et al., Radial Attention: O(n log n) Sparse Attention with Energy Decay for Long
Video Generation, arXiv 2506.19852), token-exact, as the block-sparse engine's lists and partial tiles.

The definition, for a query at frame ``i``, raster index ``k`` inside its frame, and a key at frame ``j``, index
``l``, with ``s`` tokens per frame and ``d = |i - j|``:

- ``d <= dense_band``: visible (the central band; the paper's band 0 is ``d <= 1``: ``floor(log2 max(d, 1)) = 0``);
- with ``first_frame_sink``, ``j == 0``: visible (the released Wan code's attention-sink column);
- otherwise, band ``r = floor(log2 max(d, 1))``, spatial window ``w = decay_factor * s / 2**r`` (energy decay: the
  window halves with every band outward, while the band's width in frames doubles, so every band costs about the
  same and the whole mask ``O(s * log f)`` per query):
  - ``w >= 1``: visible iff ``|k - l| < w`` (a diagonal band in raster order inside the frame pair, as the paper and
    its code; not a 2D disk);
  - ``w < 1`` (temporal decay): visible iff ``k == l`` and ``d % ceil(1 / w) == 0`` (only every ``ceil(1/w)``-th
    frame keeps its diagonal);
- text tokens (joint attention) see every token, and every image query sees every text token.

``radial_token_mask`` writes that down token by token (tests, small grids).  ``radial_plan`` builds the same mask
for any grid without a ``T x T`` tensor: frames in raster order padded to whole blocks (``masks/frames.py``; no
multiple-of-128 rule), block pairs classified per frame distance, each distinct tile evaluated once.

``granularity="block"`` rounds that mask outward to the engine's blocks, as the released code reads whole 128-token
blocks: a block pair with any visible token pair is read whole (only a frame's padded key slots stay hidden), so
the band edges cost no mask load, for a higher density (design note 48).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .frames import IMAGE, TEXT, BlockStats, FrameLayout, FramePlan, coded_tiles, frame_layout


GRANULARITIES = ("token", "block")


@dataclass(frozen=True)
class RadialRule:
    """The mask's settings for one grid (see the module docstring)."""

    frames: int
    tokens_per_frame: int
    dense_band: int = 1
    decay_factor: float = 1.0
    first_frame_sink: bool = False

    def band(self, d: int) -> tuple[bool, float, int]:
        """(dense, window w, every) of frame distance ``d``: every is ``ceil(1 / w)`` when ``w < 1``, else 1."""
        if d <= self.dense_band:
            return True, float(self.tokens_per_frame), 1
        r = max(d, 1).bit_length() - 1
        w = self.decay_factor * self.tokens_per_frame / 2 ** r
        return False, w, (math.ceil(1 / w) if w < 1 else 1)

    def covers_everything(self) -> bool:
        """True when every frame pair is dense (a window of at least the frame is dense too)."""
        return all(dense or w >= self.tokens_per_frame for dense, w, _ in map(self.band, range(self.frames)))

    def tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per frame distance 0..frames-1: dense (bool), window (float64), every (int64)."""
        bands = [self.band(d) for d in range(self.frames)]
        return (torch.tensor([b[0] for b in bands]), torch.tensor([b[1] for b in bands], dtype=torch.float64),
                torch.tensor([b[2] for b in bands], dtype=torch.int64))


def _image_visible(rule: RadialRule, tables, fi, fj, k, l):
    dense, window, every = tables
    d = (fi - fj).abs()
    w = window[d]
    seen = dense[d] | ((w >= 1) & ((k - l).abs() < w)) | ((w < 1) & (k == l) & (d % every[d] == 0))
    if rule.first_frame_sink:
        seen = seen | (fj == 0)
    return seen


def radial_token_mask(grid, *, dense_band: int = 1, decay_factor: float = 1.0,
                      first_frame_sink: bool = False) -> torch.Tensor:
    """bool ``[N, N]`` over the grid's tokens (row-major: frame, row, column): query i sees key j.  For small grids
    (tests)."""
    frames, height, width = grid
    rule = RadialRule(frames, height * width, dense_band, decay_factor, first_frame_sink)
    n = frames * height * width
    idx = torch.arange(n)
    f, r = idx // (height * width), idx % (height * width)
    return _image_visible(rule, rule.tables(), f[:, None], f[None], r[:, None], r[None])


def radial_plan(grid, *, image: tuple[int, int] | None = None, text: tuple[tuple[int, int], ...] = (),
                block: int = 64, dense_band: int = 1, decay_factor: float = 1.0, first_frame_sink: bool = False,
                granularity: str = "token", device=None) -> FramePlan:
    """The engine's plan (permutation + TiledMask) of the radial mask on ``grid`` ``(frames, height, width)`` with
    text tokens at ``text`` (see the module docstring); no ``T x T`` tensor.  ``granularity``: ``"token"`` (the
    rule exactly) or ``"block"`` (rounded outward to whole blocks of the layout)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"radial granularity: got {granularity!r}; allowed: {', '.join(GRANULARITIES)}")
    frames, height, width = (int(g) for g in grid)
    n_image = frames * height * width
    image = (0, n_image) if image is None else tuple(image)
    layout = frame_layout((frames, height, width), image, text, block)
    rule = RadialRule(frames, height * width, dense_band, decay_factor, first_frame_sink)
    tables = rule.tables()
    stats = BlockStats.of(layout)
    candidates = _candidates(rule, tables, stats)
    codes = _codes(rule, stats)

    def visible(q, k):
        qk, kk = layout.kind[q], layout.kind[k]
        seen = _image_visible(rule, tables, layout.frame[q], layout.frame[k], layout.raster[q], layout.raster[k])
        return (qk == TEXT) | (kk == TEXT) | seen

    tiled, density = coded_tiles(layout, visible, candidates, codes, whole_blocks=granularity == "block")
    return FramePlan.of(layout, tiled, density, device)


def _candidates(rule: RadialRule, tables, stats: BlockStats) -> torch.Tensor:
    """bool ``[NB, NB]``: block pairs that may hold a visible pair (a superset; exact per frame pair)."""
    dense, window, every = tables
    (qk, kk), (fi, fj) = stats.pair("kind"), stats.pair("frame")
    (a0, b0), (a1, b1) = stats.pair("raster0"), stats.pair("raster1")
    d = (fi - fj).abs().clamp(max=rule.frames - 1)
    closest = torch.maximum(torch.maximum(b0 - a1, a0 - b1), torch.zeros((), dtype=torch.int64))
    w = window[d]
    image = dense[d] | ((w >= 1) & (closest < w)) | ((w < 1) & (closest == 0) & (d % every[d] == 0))
    if rule.first_frame_sink:
        image = image | (fj == 0)
    text = (qk == TEXT) | (kk == TEXT)
    return torch.where(text, True, image & (qk == IMAGE) & (kk == IMAGE))


def _codes(rule: RadialRule, stats: BlockStats) -> torch.Tensor:
    """int64 ``[NB, NB, 6]``: what a tile's content depends on -- both kinds, the frame distance (and the sink
    column), the offset between the blocks' first raster indices, and both blocks' real slots (a prefix)."""
    (qk, kk), (fi, fj), (a0, b0), (qc, kc) = (stats.pair(n) for n in ("kind", "frame", "raster0", "count"))
    both = (qk == IMAGE) & (kk == IMAGE)
    zero = torch.zeros((), dtype=torch.int64)
    d = torch.where(both, (fi - fj).abs(), zero)
    sink = torch.where(both & (fj == 0), 1, 0) if rule.first_frame_sink else torch.zeros_like(d)
    offset = torch.where(both, a0 - b0, zero)
    parts = [qk.expand_as(d), kk.expand_as(d), d, sink, offset, (qc * (1 << 20) + kc).expand_as(d)]
    return torch.stack(parts, -1)


__all__ = ["GRANULARITIES", "FrameLayout", "RadialRule", "radial_plan", "radial_token_mask"]
