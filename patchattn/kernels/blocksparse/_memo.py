"""What is derived from a pair of block-list tensors, remembered while both live unmodified.

Static patterns reuse one ``(kv_indices, kv_counts)`` pair across layers and steps, so answers derived from it (is it
the full causal set? its transposed lists) are computed once per pair.  Weak identity keys on ``kv_counts`` (a freed
tensor's memory is never mistaken for it), a weak reference to ``kv_indices`` and both version counters (in-place
edits) decide reuse.
"""
from __future__ import annotations

import weakref

from torch.utils.weak import WeakIdKeyDictionary


class ListMemo:
    def __init__(self):
        self._entries = WeakIdKeyDictionary()

    def get(self, kv_indices, kv_counts, key: tuple, compute):
        """``compute()``'s value for this pair and ``key`` (the other inputs it depends on), reused while valid."""
        key = (*key, kv_counts._version, kv_indices._version)
        cached = self._entries.get(kv_counts)
        if cached is not None and cached[0] == key and cached[1]() is kv_indices:
            return cached[2]
        value = compute()
        self._entries[kv_counts] = (key, weakref.ref(kv_indices), value)
        return value
