"""Pure-torch hedgehog feature map (LoLCATs): ``phi(x) = [softmax(x W_h), softmax(-x W_h)]`` over the feature axis.

Shapes: ``x [B, H, T, D]``, ``weight [H, D, D]`` (one matrix per head), result float32 ``[B, H, T, 2D]``.
"""
from __future__ import annotations

import torch


def hedgehog_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    proj = torch.einsum("bhtd,hde->bhte", x.float(), weight.float())
    return torch.cat([torch.softmax(proj, dim=-1), torch.softmax(-proj, dim=-1)], dim=-1)
