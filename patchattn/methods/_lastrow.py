"""An exact path for the last query row of a call: edit its logits or probabilities, keep every other row fused.

LVLM methods that act on the token being generated (PAINT's logit boost, VHR's with/without-image head outputs)
only touch the *last* query row of a call: the prefill's last token (which gives the first generated token) and
each decode step's one token.  Every row runs through the model's own fused attention (SDPA); the last row is then
recomputed here from ``q_last . K^T`` (``O(Tk)`` per head: never a ``Tq x Tk`` matrix), edited, soft-maxed and
multiplied by ``V``, and written over the fused result.  The last row's mask is the call's own last mask row
(causal, padding, a sliding window, Gemma-3's image blocks), so every family's masking is kept.

Every layer of a forward gets the same mask, so a caller that passes its ``PatchContext`` gets the row's mask
(``RowMask``) built once per forward (``_perforward``): fewer ops queued per layer, the host's cost at short
prefills.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._perforward import per_forward


@dataclass(frozen=True)
class RowMask:
    """The keys the last query row sees: ``allowed`` bool ``[B, 1, Tk]``, its complement ``blocked``, and ``seen``
    bool ``[B]`` (the row sees some key)."""

    allowed: torch.Tensor
    blocked: torch.Tensor
    seen: torch.Tensor


def row_mask(attention_mask, batch: int, kv_len: int, device) -> RowMask:
    allowed = mask_row(attention_mask, batch, kv_len, device)
    return RowMask(allowed, ~allowed, allowed.any(-1)[:, 0])


def shared_row_mask(context, attention_mask, batch: int, kv_len: int, device) -> RowMask:
    """``row_mask``, built once per forward when ``context`` (the patch's ``PatchContext``) is given."""
    if context is None:
        return row_mask(attention_mask, batch, kv_len, device)
    return per_forward(context, "last_row_mask", (attention_mask, batch, kv_len, device),
                       lambda: row_mask(attention_mask, batch, kv_len, device))


@dataclass(frozen=True)
class LastRow:
    """The last query row of one call, ready to edit.

    Attributes:
        logits: ``[B, Hq, Tk]`` scores ``q . k * scaling`` (soft-capped where the model caps) at fp32 (fp64 inputs:
            fp64); masked keys hold ``-inf``.
        allowed: bool ``[B, 1, Tk]``: the keys the row may see (its mask row).
        value: ``[B, Hkv, Tk, D]`` the call's values at the logits' precision (one kv head per ``Hq / Hkv`` query
            heads).
        mask: the row's ``RowMask`` (``allowed`` is its ``allowed``).
    """

    logits: torch.Tensor
    allowed: torch.Tensor
    value: torch.Tensor
    mask: RowMask


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def mask_row(attention_mask, batch: int, kv_len: int, device) -> torch.Tensor:
    """bool ``[B, 1, Tk]``: the keys the call's last query row sees (all of them without a mask: a causal call's last
    row sees every key)."""
    if attention_mask is None:
        return torch.ones(batch, 1, kv_len, dtype=torch.bool, device=device)
    row = attention_mask[:, :, -1, :kv_len]
    if row.dtype != torch.bool:
        row = row > torch.finfo(row.dtype).min / 2
    return row[:, :1].expand(batch, 1, kv_len)


def last_row(query, key, value, attention_mask, *, scaling: float, softcap: float | None = None,
             context=None) -> LastRow:
    """The last query row's logits (query ``[B, Hq, Tq, D]``, key/value ``[B, Hkv, Tk, D]``; GQA without copying K);
    ``context``: the patch's ``PatchContext``, to share the row's mask between the layers of a forward."""
    batch, heads, _, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    dtype = compute_dtype(query)
    # bmm on [B * Hkv, ...] views: matmul of the 4-D tensors queues the same copy and bmm plus expands and views.
    q = query[:, :, -1].to(dtype).reshape(batch * kv_heads, heads // kv_heads, dim)
    k = _rows_of(key, dtype)
    logits = torch.bmm(q, k.transpose(1, 2)).view(batch, heads, kv_len) * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    mask = shared_row_mask(context, attention_mask, batch, kv_len, query.device)
    values = value.to(dtype, memory_format=torch.contiguous_format)  # converted once, however many outputs read it
    return LastRow(logits.masked_fill(mask.blocked, float("-inf")), mask.allowed, values, mask)


def _rows_of(t: torch.Tensor, dtype) -> torch.Tensor:
    """``[B, H, T, D]`` -> ``[B * H, T, D]`` at ``dtype`` (one copy at most)."""
    return t.to(dtype, memory_format=torch.contiguous_format).view(-1, t.shape[2], t.shape[3])


def row_output(row: LastRow, logits: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, Hq, D]``: softmax of ``logits`` (the row's own when None) times V, at the compute precision; a row that
    sees no key gives 0."""
    logits = row.logits if logits is None else logits
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return probs_output(probs, row.value)


def probs_output(probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``[B, Hq, D]`` = ``probs [B, Hq, Tk]`` times the values (each query head reads its kv head)."""
    batch, heads, kv_len = probs.shape
    kv_heads = value.shape[1]
    grouped = probs.reshape(batch * kv_heads, heads // kv_heads, kv_len)
    return torch.bmm(grouped, _rows_of(value, probs.dtype)).view(batch, heads, value.shape[-1])


def write_last_row(out: torch.Tensor, row_out: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """The fused output ``[B, Tq, Hq, D]`` with its last row replaced by ``row_out`` ``[B, Hq, D]`` where the row sees
    a key (``seen`` bool ``[B]``); a fully masked row (padding) keeps the fused value."""
    out = out.clone()
    keep = out[:, -1]
    out[:, -1] = torch.where(seen[:, None, None], row_out.to(out.dtype), keep)
    return out


def edited_last_row(out: torch.Tensor, row: LastRow, edit: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """The fused output with its last row recomputed from ``edit(logits, allowed) -> logits`` (edits of masked keys are
    ignored: they stay masked)."""
    logits = edit(row.logits, row.allowed)
    logits = logits.masked_fill(row.mask.blocked, float("-inf"))
    return write_last_row(out, row_output(row, logits), row.mask.seen)


__all__ = ["LastRow", "RowMask", "compute_dtype", "edited_last_row", "last_row", "mask_row", "probs_output",
           "row_mask", "row_output", "shared_row_mask", "write_last_row"]
