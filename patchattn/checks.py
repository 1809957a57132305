"""Input checks shared by every adapter: bad input gets a clear error instead of silent garbage.

The NaN/Inf check costs one reduction (and, on a GPU, one synchronisation) per attention call at prefill; set
``PATCHATTN_CHECKS=0`` to skip it when every microsecond counts.  Decode steps (one query) are never checked.
"""

from __future__ import annotations

import os

import torch


def checks_enabled() -> bool:
    return os.environ.get("PATCHATTN_CHECKS", "1") != "0"


def check_inputs(method: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """ValueError for non-finite queries/keys/values at prefill, or for shapes no method can handle."""
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        raise ValueError(
            f"{method}: query/key/value must be [batch, heads, tokens, head_dim]; got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if query.shape[1] % key.shape[1] != 0:
        raise ValueError(
            f"{method}: query heads ({query.shape[1]}) must be a multiple of key/value heads ({key.shape[1]})"
        )
    if not checks_enabled() or query.shape[2] <= 1:
        return
    tensors = (("query", query), ("key", key), ("value", value))
    finite = torch.stack([torch.isfinite(t).all() for _, t in tensors])
    if bool(finite.all()):  # one host read for the three (on a GPU: one synchronisation per call, not three)
        return
    for name, tensor in (tensors[i] for i in range(3) if not finite[i]):
        raise ValueError(
            f"{method}: the attention {name} contains NaN or Inf (shape {tuple(tensor.shape)}); check the model "
                "inputs and dtype (fp16 overflow?). Set PATCHATTN_CHECKS=0 to skip this check."
            )
