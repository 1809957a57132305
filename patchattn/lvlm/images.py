"""Image side of CARVE: from a token-grid attention map to kept regions, and the masked or cropped image.

Images are ``torch.Tensor [C, H, W]`` (any float range) or PIL images (converted through numpy, returned as PIL).
The map is ``[h, w]`` over the vision tokens' grid; regions are found on that grid and scaled to pixels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["apply_regions", "as_tensor", "connected_regions", "keep_top_regions", "like_input", "top_p_cells"]


def as_tensor(image) -> torch.Tensor:
    """``[C, H, W]`` float tensor of a tensor or PIL image (PIL: 0..255 values, as the processors take them)."""
    if torch.is_tensor(image):
        if image.dim() != 3:
            raise ValueError(f"image tensor: got {tuple(image.shape)}; allowed: [C, H, W]")
        return image.float()
    try:
        import numpy as np
        from PIL import Image
    except ImportError as err:  # pragma: no cover - PIL is how images usually arrive
        raise TypeError(f"image must be a torch.Tensor [C, H, W] or a PIL image, got {type(image).__name__}") from err
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a torch.Tensor [C, H, W] or a PIL image, got {type(image).__name__}")
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)


def like_input(pixels: torch.Tensor, original):
    """``pixels`` in the type the caller gave (a PIL image back as PIL)."""
    if torch.is_tensor(original):
        return pixels.to(original.dtype)
    from PIL import Image

    array = pixels.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def top_p_cells(score: torch.Tensor, top_p: float) -> torch.Tensor:
    """bool ``[h, w]``: the cells at or above the ``1 - top_p`` quantile of ``score`` (the top ``top_p`` share;
    ``top_p = 1`` keeps every cell: no masking)."""
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    flat = score.flatten().double()
    keep = max(1, math.ceil(top_p * flat.numel()))
    threshold = flat.sort(descending=True).values[keep - 1]
    return score.double() >= threshold


def connected_regions(cells: torch.Tensor) -> list[list[tuple[int, int]]]:
    """4-connected components of a bool ``[h, w]`` grid, each a list of ``(row, col)`` (grids are small: a
    breadth-first search on the host)."""
    h, w = cells.shape
    grid = cells.tolist()
    seen = [[False] * w for _ in range(h)]
    regions = []
    for r0 in range(h):
        for c0 in range(w):
            if not grid[r0][c0] or seen[r0][c0]:
                continue
            seen[r0][c0] = True
            stack, region = [(r0, c0)], []
            while stack:
                r, c = stack.pop()
                region.append((r, c))
                for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                    if 0 <= nr < h and 0 <= nc < w and grid[nr][nc] and not seen[nr][nc]:
                        seen[nr][nc] = True
                        stack.append((nr, nc))
            regions.append(region)
    return regions


def keep_top_regions(score: torch.Tensor, cells: torch.Tensor, regions: int) -> torch.Tensor:
    """bool ``[h, w]``: the ``regions`` connected components of ``cells`` with the largest summed ``score``."""
    found = connected_regions(cells)
    total = [sum(float(score[r, c]) for r, c in region) for region in found]
    order = sorted(range(len(found)), key=lambda i: -total[i])[:regions]
    kept = torch.zeros_like(cells, dtype=torch.bool)
    for i in order:
        for r, c in found[i]:
            kept[r, c] = True
    return kept


def apply_regions(pixels: torch.Tensor, kept: torch.Tensor, mode: str, fill: float = 0.0) -> torch.Tensor:
    """The refined image: ``"mask"`` sets pixels outside the kept cells to ``fill``; ``"crop"`` cuts the kept cells'
    bounding box and resizes it back to the image's size (bilinear)."""
    _, height, width = pixels.shape
    if mode == "mask":
        up = F.interpolate(kept[None, None].float(), size=(height, width), mode="nearest")[0, 0].bool()
        return torch.where(up, pixels, torch.full_like(pixels, fill))
    if mode == "crop":
        rows, cols = kept.nonzero(as_tuple=True)
        h, w = kept.shape
        top, bottom = int(rows.min()) * height // h, (int(rows.max()) + 1) * height // h
        left, right = int(cols.min()) * width // w, (int(cols.max()) + 1) * width // w
        box = pixels[:, top:bottom, left:right]
        return F.interpolate(box[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    raise ValueError(f"mode must be 'mask' or 'crop', got {mode!r}")
