"""Facts of one forward, computed on its first attention call and reused by every later layer.

An LVLM forward hands every layer the same tensors: the adapter's image-token mask (``context.layout``) and the
model's attention mask (transformers builds one per forward).  What a method derives from them on the host (does
the prompt have an image, where the first editable row is) is the same in every layer, so it is read once per
forward -- one host-device synchronisation instead of one per layer -- and cached in ``context.extras`` keyed by
the *identity* of those tensors (held, so an id cannot be reused while cached; a new forward brings new tensors).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

EXTRAS_PREFIX = "per_forward:"


def same_key(kept: tuple, key: tuple) -> bool:
    """Whether ``key`` is ``kept``: tensors by identity, other items by type and value.  A loop of plain checks, no
    helper per item: every layer of every forward compares its keys here (design note 57)."""
    if len(kept) != len(key):
        return False
    for a, b in zip(kept, key):
        if a is b:
            continue
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or type(a) is not type(b) or a != b:
            return False
    return True


def per_forward(context, name: str, key: tuple, compute: Callable[[], Any]):
    """``compute()`` once for ``key`` (tensors compared by identity, other items by value), cached in
    ``context.extras`` under ``name``; the latest key only (one forward at a time)."""
    slot = EXTRAS_PREFIX + name
    entry = context.extras.get(slot)
    if entry is not None and same_key(entry[0], key):
        return entry[1]
    value = compute()
    context.extras[slot] = (tuple(key), value)
    return value


def has_image(context, image: torch.Tensor | None) -> bool:
    """Whether the forward's image-token mask marks any token (one host read per forward)."""
    if image is None:
        return False
    return per_forward(context, "has_image", (image,), lambda: bool(image.any()))


__all__ = ["has_image", "per_forward"]
