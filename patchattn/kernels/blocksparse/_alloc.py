"""Output allocation shared by the Triton paths.

Tests set ``POISON_OUTPUTS = True`` (or the environment variable ``PATCHATTN_POISON=1``) so every
buffer a kernel must fill starts as NaN: an element a kernel forgets to write then fails the check
instead of silently holding whatever the allocator handed back.
"""
import os

import torch

POISON_OUTPUTS = os.environ.get("PATCHATTN_POISON", "0") == "1"


def empty(shape, dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out
