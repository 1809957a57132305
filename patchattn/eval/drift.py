"""Output drift of a patched (or tuned) DiT transformer from its dense teacher: cosine similarity, PSNR and MSE of
the student's output against the teacher's on the same inputs.

This is *drift*, not quality: it says how far the student's velocity / noise prediction moved from the dense
model's on the inputs given (for DiT distillation: held-out synthetic inputs), not whether generated images or
videos are good.  Image-quality metrics need real prompts, a pipeline and a reference set.

- cosine: per sample, of the flattened outputs, then averaged over samples (1.0: same direction);
- PSNR (dB): per sample, ``10 log10(range^2 / mse)`` with ``range`` the teacher output's max - min in that
  sample (the teacher's dynamic range plays the role of the peak value), then averaged; ``inf`` when equal;
- MSE: mean squared difference over every element.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

__all__ = ["DRIFT_NOTE", "cosine", "drift", "psnr"]

DRIFT_NOTE = ("drift of the student transformer's output from the dense teacher on held-out synthetic inputs "
              "(cosine, PSNR, MSE): how far the output moved, not image/video quality")


def cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per sample (first axis) of the flattened outputs."""
    s, t = student.flatten(1).double(), teacher.flatten(1).double()
    return torch.nn.functional.cosine_similarity(s, t, dim=1)


def psnr(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """PSNR per sample in dB, the peak being the teacher sample's range (max - min); ``inf`` where they are equal."""
    s, t = student.flatten(1).double(), teacher.flatten(1).double()
    mse = (s - t).pow(2).mean(1)
    span = t.amax(1) - t.amin(1)
    return torch.where(mse > 0, 10 * torch.log10(span.pow(2) / mse), torch.full_like(mse, math.inf))


@torch.no_grad()
def drift(student: Callable[[dict], torch.Tensor], teacher: Callable[[dict], torch.Tensor],
          batches: Iterable[dict]) -> dict:
    """Mean cosine, PSNR and MSE of ``student(inputs)`` vs ``teacher(inputs)`` over every sample of ``batches``.

    ``student`` and ``teacher`` map one batch of transformer inputs to the output tensor ``[B, ...]``.
    """
    cosines, psnrs, squared, count = [], [], 0.0, 0
    for inputs in batches:
        want, got = teacher(inputs).float(), student(inputs).float()
        cosines.append(cosine(got, want))
        psnrs.append(psnr(got, want))
        squared += float((got.double() - want.double()).pow(2).sum())
        count += want.numel()
    if not cosines:
        raise ValueError("drift needs at least one batch of inputs")
    return {"cosine": float(torch.cat(cosines).mean()), "psnr_db": float(torch.cat(psnrs).mean()),
            "mse": squared / count, "samples": int(sum(c.numel() for c in cosines))}
