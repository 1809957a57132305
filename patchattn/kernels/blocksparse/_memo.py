"""What is derived from a pair of block-list tensors, remembered while both live unmodified.

Static patterns reuse one ``(kv_indices, kv_counts)`` pair across layers and steps, so answers derived from it (is it
the full causal set? its transposed lists) are computed once per pair; a helper that builds a pair can also record
what it knows about it (``causal_blocks`` marks its lists full).  Weak identity keys on ``kv_counts`` (a freed
tensor's memory is never mistaken for it), a weak reference to ``kv_indices`` and both version counters (in-place
edits) decide reuse.
"""
from __future__ import annotations

import weakref

from torch.utils.weak import WeakIdKeyDictionary


class ListMemo:
    def __init__(self):
        self._entries = WeakIdKeyDictionary()

    def _answers(self, kv_indices, kv_counts, create: bool):
        """The dict of answers (by key) for this pair as it is now, or None (a fresh one if ``create``)."""
        versions = (kv_counts._version, kv_indices._version)
        cached = self._entries.get(kv_counts)
        if cached is not None and cached[0] == versions and cached[1]() is kv_indices:
            return cached[2]
        if not create:
            return None
        answers = {}
        self._entries[kv_counts] = (versions, weakref.ref(kv_indices), answers)
        return answers

    def peek(self, kv_indices, kv_counts, key: tuple):
        """The remembered value for this pair and ``key``, or None."""
        answers = self._answers(kv_indices, kv_counts, create=False)
        return None if answers is None else answers.get(key)

    def put(self, kv_indices, kv_counts, key: tuple, value) -> None:
        self._answers(kv_indices, kv_counts, create=True)[key] = value

    def get(self, kv_indices, kv_counts, key: tuple, compute):
        """``compute()``'s value for this pair and ``key`` (the other inputs it depends on), reused while valid."""
        answers = self._answers(kv_indices, kv_counts, create=True)
        if key not in answers:
            answers[key] = compute()
        return answers[key]
