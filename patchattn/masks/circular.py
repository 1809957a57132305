"""CLEAR's local attention (Liu et al., CLEAR: Conv-Like Linearization Revs Pre-Trained Diffusion Transformers Up,
arXiv 2412.16112), token-exact, as the block-sparse engine's lists and partial tiles.

The definition, for an image query at frame ``i``, row ``y``, column ``x`` and an image key at ``(j, y', x')``:
visible iff ``|i - j| <= frame_window`` and ``(y - y')**2 + (x - x')**2 < radius**2`` (CLEAR's ``mask_mod``: a
circular window of Euclidean radius ``radius`` on the 2D latent grid, strict; ``frame_window = 0`` is the window
inside each frame of a video).  Text tokens (joint attention) see every token, and every image query sees every
text token.

``circular_token_mask`` writes that down token by token (tests, small grids).  ``circular_plan`` builds it for any
grid without a ``T x T`` tensor: each frame cut into 2D tiles of one block each (``masks/frames.py``), so most tiles
a window covers are whole, and each distinct partial tile (the window's rim, the grid's edge) is evaluated once.
"""

from __future__ import annotations

import torch

from .frames import IMAGE, TEXT, BlockStats, FramePlan, coded_tiles, frame_layout, square_tile


def _image_visible(radius: float, frame_window: int, fi, fj, yq, yk, xq, xk):
    dy, dx = yq - yk, xq - xk
    near = (dy * dy + dx * dx).double() < radius * radius
    return near & ((fi - fj).abs() <= frame_window)


def covers_everything(grid, radius: float, frame_window: int) -> bool:
    """True when every image query sees every image key (the window covers the grid in every frame pair)."""
    frames, height, width = grid
    return frame_window >= frames - 1 and (height - 1) ** 2 + (width - 1) ** 2 < radius * radius


def circular_token_mask(grid, radius: float, frame_window: int = 0) -> torch.Tensor:
    """bool ``[N, N]`` over the grid's tokens (row-major: frame, row, column): query i sees key j (tests)."""
    frames, height, width = grid
    idx = torch.arange(frames * height * width)
    f, y, x = idx // (height * width), idx // width % height, idx % width
    return _image_visible(radius, frame_window, f[:, None], f[None], y[:, None], y[None], x[:, None], x[None])


def circular_plan(grid, radius: float, *, frame_window: int = 0, image: tuple[int, int] | None = None,
                  text: tuple[tuple[int, int], ...] = (), block: int = 64, tile: tuple[int, int] | None = None,
                  device=None) -> FramePlan:
    """The engine's plan (permutation + TiledMask) of the circular window on ``grid`` ``(frames, height, width)``
    with text tokens at ``text``; ``tile``: ``(th, tw)`` tokens per block, default as square as ``block`` allows."""
    frames, height, width = (int(g) for g in grid)
    n_image = frames * height * width
    image = (0, n_image) if image is None else tuple(image)
    tile = square_tile(block, height, width) if tile is None else tuple(tile)
    layout = frame_layout((frames, height, width), image, text, block, tile=tile)
    stats = BlockStats.of(layout)

    def visible(q, k):
        seen = _image_visible(radius, frame_window, layout.frame[q], layout.frame[k], layout.y[q], layout.y[k],
                              layout.x[q], layout.x[k])
        return (layout.kind[q] == TEXT) | (layout.kind[k] == TEXT) | seen

    tiled, density = coded_tiles(layout, visible, _candidates(stats, radius, frame_window), _codes(stats, frame_window))
    return FramePlan.of(layout, tiled, density, device)


def _gap(a0, a1, b0, b1):
    """Smallest ``|u - v|`` for u in ``[a0, a1]``, v in ``[b0, b1]``."""
    return torch.maximum(torch.maximum(b0 - a1, a0 - b1), torch.zeros((), dtype=torch.int64))


def _candidates(stats: BlockStats, radius: float, frame_window: int) -> torch.Tensor:
    """bool ``[NB, NB]``: block pairs whose tiles' nearest tokens are inside the window (a superset)."""
    (qk, kk), (fi, fj) = stats.pair("kind"), stats.pair("frame")
    (yq0, yk0), (yq1, yk1) = stats.pair("y0"), stats.pair("y1")
    (xq0, xk0), (xq1, xk1) = stats.pair("x0"), stats.pair("x1")
    gy, gx = _gap(yq0, yq1, yk0, yk1), _gap(xq0, xq1, xk0, xk1)
    image = ((gy * gy + gx * gx).double() < radius * radius) & ((fi - fj).abs() <= frame_window)
    text = (qk == TEXT) | (kk == TEXT)
    return torch.where(text, True, image & (qk == IMAGE) & (kk == IMAGE))


def _codes(stats: BlockStats, frame_window: int) -> torch.Tensor:
    """int64 ``[NB, NB, 7]``: both kinds, whether the frames are within reach, the offset between the tiles'
    origins, and both tiles' real extents (rows and columns inside the grid)."""
    (qk, kk), (fi, fj) = stats.pair("kind"), stats.pair("frame")
    (yq0, yk0), (xq0, xk0) = stats.pair("y0"), stats.pair("x0")
    (yq1, yk1), (xq1, xk1) = stats.pair("y1"), stats.pair("x1")
    (qc, kc) = stats.pair("count")
    both = (qk == IMAGE) & (kk == IMAGE)
    zero = torch.zeros((), dtype=torch.int64)
    reach = torch.where(both & ((fi - fj).abs() <= frame_window), 1, 0)
    dy, dx = torch.where(both, yq0 - yk0, zero), torch.where(both, xq0 - xk0, zero)
    q_extent = torch.where(qk == IMAGE, (yq1 - yq0) * (1 << 16) + (xq1 - xq0), qc)
    k_extent = torch.where(kk == IMAGE, (yk1 - yk0) * (1 << 16) + (xk1 - xk0), kc)
    parts = [qk, kk, reach, dy, dx, q_extent, k_extent]
    return torch.stack(torch.broadcast_tensors(*parts), -1)


__all__ = ["circular_plan", "circular_token_mask", "covers_everything"]
