"""Padded batches, row by row: a method whose choices depend on positions sees each row as if it were alone.

Block-sparse patterns count sinks, windows, strides and segments from the first token of the sequence, and
dynamic selections score whole key blocks.  In a padded batch the first token of a row is not the first of the
tensor, so reading the batch as one sequence would place every block relative to the padding.  Instead the rows
of a padded batch are split into groups that share their real span (same left and right padding), and the method
runs once per group on the real tokens only; padded query rows get zeros (nothing reads them: real queries never
attend to padding).  This equals running each row alone, which is what batched ``generate`` users expect.

A group keeps its own copy of the method's between-call state (the compressed key cache, decode lists), so
decoding a padded batch keeps one cache per group, as separate sequences would.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

Span = tuple[int, int]  # (first real position, one past the last real position) of one row


class PaddingError(ValueError):
    """The mask is not causal attention over each row's contiguous real span (a sliding window, bidirectional
    image tokens, a hole in the middle of a row)."""


# What was last read from a mask, per reader: (weak reference to the mask, its version counter and the lengths,
# result).  Every layer of a forward receives the same mask, so it is read (and synchronised with the host) once.
_LATEST: dict = {}


def _read_once(reader, attention_mask, q_len: int, kv_len: int):
    key = (attention_mask._version, q_len, kv_len)
    cached = _LATEST.get(reader)
    if cached is not None and cached[0]() is attention_mask and cached[1] == key:
        return cached[2]
    result = reader(attention_mask, q_len, kv_len)
    _LATEST[reader] = (weakref.ref(attention_mask), key, result)
    return result


def padding_spans(attention_mask, q_len: int, kv_len: int) -> tuple[Span, ...] | None:
    """Each row's real span when ``attention_mask`` is causal attention within it; None when no row is padded.

    ``attention_mask`` is transformers' boolean SDPA mask ``[B, 1, Tq, Tk]`` (or None: nothing padded).  The
    queries are the last ``q_len`` of ``kv_len`` positions.  A row with no real token in this call gets an empty
    span.  Raises PaddingError when the mask has another structure.
    """
    if attention_mask is None:
        return None
    return _read_once(_parse_spans, attention_mask, q_len, kv_len)


def row_starts(attention_mask, q_len: int, kv_len: int) -> torch.Tensor | None:
    """``[B]`` int32 first real key of each row on the mask's device (built once per mask, as its spans are), or
    None when no row starts after the first key."""
    return _read_once(_row_starts, attention_mask, q_len, kv_len)


def _row_starts(attention_mask, q_len: int, kv_len: int) -> torch.Tensor | None:
    spans = padding_spans(attention_mask, q_len, kv_len)
    if spans is None or not any(start > 0 for start, _ in spans):
        return None
    return torch.tensor([start for start, _ in spans], dtype=torch.int32, device=attention_mask.device)


@dataclass(frozen=True)
class KeyBounds:
    """Each row's real keys ``[starts, ends)`` as ``[B]`` int32 device tensors, for a decode step whose queries are
    not the last keys of the tensor (a static cache's empty slots follow them) and whose rows may start late
    (padding), worked out without a host read so the step compiles whole (``torch.compile(fullgraph=True)``) and
    replays in a CUDA graph.  A row with no real key has ``starts == ends == 0``."""

    starts: torch.Tensor
    ends: torch.Tensor
    lengths: torch.Tensor
    # What the layers of one eager forward share (they get the same mask, hence the same bounds): block lists by
    # plan, so each is built once per step rather than once per layer.  Unused in a compiled step.
    shared: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)


def key_bounds(attention_mask) -> KeyBounds:
    """The real keys of each row from the newest query's row of transformers' boolean mask ``[B, 1, Tq, Tk]``: the
    first and one past the last key it sees (device ops with static shapes only; the mask's structure is trusted,
    not checked -- the host path, ``padding_spans``, checks it).  An eager forward reads each mask once."""
    if torch.compiler.is_compiling():
        return _key_bounds(attention_mask)
    return _read_once(_bounds_of, attention_mask, 1, attention_mask.shape[-1])


def _bounds_of(attention_mask, _q_len: int, _kv_len: int) -> KeyBounds:
    return _key_bounds(attention_mask)


def _key_bounds(attention_mask) -> KeyBounds:
    seen = attention_mask[:, 0, -1, :]
    kv_len = seen.shape[-1]
    any_seen = seen.any(-1)
    starts = torch.where(any_seen, seen.int().argmax(-1), 0)
    ends = torch.where(any_seen, kv_len - seen.flip(-1).int().argmax(-1), 0)
    starts, ends = starts.to(torch.int32), ends.to(torch.int32)
    return KeyBounds(starts, ends, ends - starts)


def real_blocks(lengths: torch.Tensor, kv_len: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode lists reading every real key of each row, block ids counted from its first one: (``[B, 1, 1, NK]`` int32
    ids ``0..NK-1`` for the capacity ``kv_len``, ``[B, 1, 1]`` counts of the ``lengths`` rows' blocks)."""
    n_k = -(-kv_len // block)
    idx = torch.arange(n_k, device=lengths.device, dtype=torch.int32).expand(lengths.shape[0], n_k)
    counts = torch.div(lengths.long() + block - 1, block, rounding_mode="floor").clamp(0, n_k)
    return idx.reshape(-1, 1, 1, n_k), counts.to(torch.int32).view(-1, 1, 1)


def keys_in_use(attention_mask, q_len: int, kv_len: int) -> int:
    """How many leading keys the queries can see: ``kv_len``, or fewer with a static cache, whose slots after the
    newest token are empty (and masked).  A dynamic cache always ends with the newest token."""
    if attention_mask is None or q_len >= kv_len or attention_mask.dtype != torch.bool:
        return kv_len
    return _read_once(_last_visible_key, attention_mask, q_len, kv_len)


def _last_visible_key(attention_mask, q_len: int, kv_len: int) -> int:
    last = attention_mask[:, :, -1, :kv_len].any(dim=1)  # [B, Tk]: keys the newest query of each row sees
    if not bool(last.any()):
        return kv_len
    return kv_len - int(last.any(dim=0).flip(-1).int().argmax())


def _parse_spans(attention_mask, q_len: int, kv_len: int) -> tuple[Span, ...] | None:
    if attention_mask.dtype != torch.bool or attention_mask.ndim != 4 or attention_mask.shape[1] != 1:
        raise PaddingError("expected transformers' boolean SDPA mask [B, 1, Tq, Tk]")
    mask = attention_mask[:, 0, -q_len:, :kv_len]
    keys = torch.arange(kv_len, device=mask.device)
    # The last query row sees exactly the row's real keys: it is either the newest real token, or (right padding)
    # a padding row, which transformers lets see the real keys.
    last = mask[:, -1]
    seen = last.any(-1)
    start = torch.where(seen, last.int().argmax(-1), 0)
    end = torch.where(seen, kv_len - last.flip(-1).int().argmax(-1), 0)
    real_key = (keys[None] >= start[:, None]) & (keys[None] < end[:, None])
    positions = torch.arange(q_len, device=mask.device) + (kv_len - q_len)
    real_query = (positions[None] >= start[:, None]) & (positions[None] < end[:, None])  # [B, Tq]
    expected = real_key[:, None, :] & (keys[None, None, :] <= positions[None, :, None]) & real_query[..., None]
    if not torch.equal(last, real_key) or not torch.equal(mask & real_query[..., None], expected):
        raise PaddingError("the mask is not causal attention over each row's real tokens (left/right padding)")
    if bool((seen & ~real_query.any(-1)).any()):
        # Keys after the newest query (a static cache's empty slots): the queries are not the last positions.
        raise PaddingError("the queries are not the last positions of the keys (a static KV cache?)")
    spans = tuple(zip(start.tolist(), end.tolist()))
    return None if all(span == (0, kv_len) for span in spans) else spans


def row_groups(spans: tuple[Span, ...]) -> dict[Span, list[int]]:
    """Rows by their span, in order of first appearance."""
    groups: dict[Span, list[int]] = {}
    for row, span in enumerate(spans):
        groups.setdefault(span, []).append(row)
    return groups


def _rows_index(rows: list[int], device):
    """A slice when the rows are contiguous (a view), else an index tensor (a copy)."""
    if rows == list(range(rows[0], rows[-1] + 1)):
        return slice(rows[0], rows[-1] + 1)
    return torch.tensor(rows, device=device)


def run_by_rows(state, query, key, value, spans: tuple[Span, ...],
                run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``[B, Tq, Hq, Dv]``: ``run(query, key, value)`` (unpadded, transformers' layout in, ``[B', Tq', Hq, Dv]``
    out) once per group of rows with the same real span; padded query rows are zero.  The density recorded is the
    groups' mean weighted by their real query rows."""
    batch, heads, q_len, _ = query.shape
    offset = key.shape[2] - q_len  # position of the first query
    out = query.new_zeros(batch, q_len, heads, value.shape[-1])
    weighted = []
    for (start, end), rows in row_groups(spans).items():
        first, stop = max(0, start - offset), max(0, end - offset)  # the group's real query rows
        if stop <= first:
            continue
        pick = _rows_index(rows, query.device)
        with group_state(state, (tuple(rows), start)):
            out[pick, first:stop] = run(query[pick, :, first:stop], key[pick, :, start:end],
                                        value[pick, :, start:end])
        weighted.append((len(rows) * (stop - first), state._raw_stats.get("density")))
    _record_mean_density(state, weighted)
    return out


def _record_mean_density(state, weighted) -> None:
    weighted = [(w, d) for w, d in weighted if d is not None]
    if not weighted:
        return
    total = sum(w for w, _ in weighted)

    def mean():
        return sum(w * float(d() if callable(d) else d) for w, d in weighted) / total

    state.record(density=mean)


@contextlib.contextmanager
def group_state(state, group_key):
    """Within the block, ``state.method_state`` is this row group's own copy (created on first use with the
    between-call caches cleared), so caches of different groups never mix.  States without ``row_states`` (methods
    that keep only per-shape caches) are shared by the groups."""
    main = state.method_state
    groups = getattr(main, "row_states", None)
    if groups is None:  # the method keeps nothing between calls that depends on the sequence
        yield
        return
    if group_key not in groups:
        groups[group_key] = fresh_copy(main)
    state.method_state = groups[group_key]
    try:
        yield
    finally:
        state.method_state = main


def fresh_copy(method_state):
    """A shallow copy sharing the plan (fixed at patch time) with the between-call caches reset to their defaults."""
    clone = copy.copy(method_state)
    clear_caches(clone)
    return clone


def clear_caches(method_state) -> None:
    """Reset the fields named in ``CACHE_FIELDS`` (what a method keeps between calls of one sequence)."""
    defaults = {f.name: f for f in dataclasses.fields(method_state)}
    for name in method_state.CACHE_FIELDS:
        f = defaults[name]
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        setattr(method_state, name, value)
