"""What a bounded KV cache hands a method, and what the method tells it to keep (no transformers here).

A bounded cache (``patchattn.adapters.kv_cache``) stores, per layer, only the keys a method can still read.  Its
keys are then *slots*, not the sequence's positions ``0..T-1``: each slot carries the position of the token it
holds (counted from the row's first real token, as the padded path counts: ``_rows.py``), or -1 when empty.  The
cache publishes one ``KeptKeys`` per attention call on the layer's method state (``publish``); the method takes it
(``take``), attends over the slots with the visibility its pattern gives at those positions, and answers with the
slots any later query may still read (``KeptKeys.retain``): the cache frees the rest.

Keys are cached after RoPE, so a kept key keeps the rotary position it was computed at (the "original positions"
variant: DuoAttention's and H2O's code; StreamingLLM's paper re-numbers positions inside the cache).  That is what
makes the tokens equal to the masked, non-evicting path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..masks.static import sink_and_window_runs
from ._rows import PaddingError, row_starts
from ._sparse import run_block_sparse

# method name -> plan(state, kv_heads) -> SlotPlan | None (None: this layer keeps every key); registered by each
# method that can bound its memory; the plan raises ValueError when the config cannot (a window that grows).
BOUNDED_PLANS: dict[str, Callable] = {}


@dataclass(frozen=True)
class SlotPlan:
    """How a layer is stored: its KV heads in groups, each group with its own slots (DuoAttention: the retrieval
    heads at full length, the streaming heads bounded); ``per_head``: each head keeps its own keys (H2O)."""

    groups: tuple[tuple[int, ...], ...]
    per_head: bool = False
    # Per group, the slots per row it ever needs, the call's new token included (a fixed-size buffer: static shapes
    # for torch.compile), or None when the group grows with the input (duo's retrieval heads).
    capacity: tuple[int | None, ...] = ()
    # Per query head, whether it reads every slot of its group (duo's retrieval heads): host values, fixed when the
    # cache is made, so a compiled step branches on constants.
    heads_reading_all: tuple[bool, ...] = ()


@dataclass
class SlotGroup:
    """One group's slots for this call: the kept keys then the call's new ones."""

    kv_heads: tuple[int, ...]
    keys: torch.Tensor  # [B, h, S, D]
    values: torch.Tensor  # [B, h, S, Dv]
    positions: torch.Tensor  # [B, 1 or h, S] long; -1: empty slot (or a padding token)


@dataclass
class KeptKeys:
    """One attention call on a bounded cache.

    ``plain``: the call's keys are the sequence's own (a prefill on an empty cache): the method runs its usual
    path on ``key``/``value`` and the transformers mask.  ``query_positions`` ``[B, Tq]``: the new tokens'
    positions (-1: padding).  ``retain(keep)``: one bool ``[B, 1 or h, S]`` per group, the slots to keep; returns
    the gather index ``[B, 1 or h, S']`` it compacted each group with (per-slot state follows it)."""

    groups: tuple[SlotGroup, ...]
    query_positions: torch.Tensor
    plain: bool
    retain: Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]]
    # plain calls: count the positions from these row starts ([B]) instead; returns the new query positions
    recount: Callable[[torch.Tensor], torch.Tensor] | None = None
    plan: SlotPlan | None = None
    # Static caches: the slots per row of each group's fixed buffer (per-slot method state is kept at that width);
    # ``in_place``: a decode step whose new token already sits in a free slot (not after the kept ones).
    slots: tuple[int, ...] | None = None
    in_place: bool = False

    def count_rows_from(self, attention_mask) -> None:
        """A plain call's positions from each row's first real token as the mask gives it (``_rows``), which the
        cache's guess from ``position_ids`` cannot always see (Qwen2-VL passes none); kept when the mask is not
        causal + padding."""
        if not self.plain or self.recount is None:
            return
        batch, kv_len = self.query_positions.shape[0], self.query_positions.shape[1]
        try:
            start = None if attention_mask is None else row_starts(attention_mask, attention_mask.shape[2], kv_len)
        except PaddingError:
            return
        if start is None:
            start = torch.zeros(batch, dtype=torch.long, device=self.query_positions.device)
        self.query_positions = self.recount(start.long())


KEPT_FIELD = "kept_keys"


def publish(method_state, kept: KeptKeys) -> None:
    setattr(method_state, KEPT_FIELD, kept)


def take(method_state) -> KeptKeys | None:
    """This call's ``KeptKeys`` (cleared: a later call without the bounded cache sees none), or None."""
    kept = getattr(method_state, KEPT_FIELD, None)
    if kept is not None:
        setattr(method_state, KEPT_FIELD, None)
    return kept


def bounded_or_sparse(module, query, key, value, attention_mask, *, scaling, select, decode_rows, keeps: Callable,
                      bounded: Callable, **kwargs):
    """The forward of a static-pattern method that bounds its cache: over a bounded cache's slots ``bounded(state,
    query, kept, scaling=, softcap=)``; otherwise the block-sparse path, then (a bounded cache's first call, which
    gets every key) ``keeps(state, kept, query_heads)`` says which slots later queries may still read."""
    state = module.patchattn
    kept = take(state.method_state)
    if kept is not None and not kept.plain:
        return bounded(state, query, kept, scaling=scaling, softcap=kwargs.get("softcap")), None
    out = run_block_sparse(module, query, key, value, attention_mask, scaling=scaling, select=select, static=True,
                           decode_rows=decode_rows, state=state, **kwargs)
    if kept is not None:
        kept.count_rows_from(attention_mask)
        kept.retain(keeps(state, kept, query.shape[1]))
    return out


def register_bounded(method: str, plan: Callable) -> None:
    BOUNDED_PLANS[method] = plan


def check_fixed_window(config) -> None:
    """ValueError when ``density`` sets the window: it then follows the input length, so memory is not bounded."""
    if config.density is not None:
        raise ValueError(f"{type(config).method} with density={config.density}: the window follows the input length, "
                         "so memory cannot be bounded; give window= (tokens) instead")


def compaction(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gather index ``[.., S']``, valid ``[.., S']``): the kept slots first, in their order; ``S'`` the most any
    row keeps (one host sync)."""
    count = keep.sum(-1)
    width = int(count.max()) if keep.numel() else 0
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[..., :width]
    valid = torch.arange(width, device=keep.device) < count[..., None]
    return order, valid


def causal_slots(query_positions: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """bool ``[B, 1 or h, Tq, S]``: filled slots at or before each (real) query."""
    q = query_positions[:, None, :, None]
    k = positions[:, :, None, :]
    return (k >= 0) & (k <= q) & (q >= 0)


def attend_slots(query, keys, values, visible, *, scaling: float, softcap=None) -> torch.Tensor:
    """Softmax attention of ``query`` ``[B, Hq, Tq, D]`` over slots ``[B, h, S, D]`` (GQA: ``Hq`` a multiple of
    ``h``) where ``visible`` (bool ``[B, 1, h or Hq, Tq, S]``-broadcastable) says; ``[B, Tq, Hq, Dv]``.  SDPA with the
    mask (its memory-efficient kernels on GPU: a duo retrieval head reads its whole cache each step); soft-capped
    logits (Gemma-2) in fp32 maths.  A query that sees nothing (padding) gets zeros."""
    group = query.shape[1] // keys.shape[1]
    if visible.shape[1] not in (1, query.shape[1]):
        visible = visible.repeat_interleave(group, 1)
    if softcap is None:
        out = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=visible, scale=scaling,
                                                               enable_gqa=group > 1)
        return out.nan_to_num(0.0).transpose(1, 2)
    k = keys.repeat_interleave(group, 1).float() if group > 1 else keys.float()
    v = values.repeat_interleave(group, 1).float() if group > 1 else values.float()
    scores = softcap * torch.tanh((query.float() @ k.transpose(-1, -2)) * scaling / softcap)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    return (probs @ v).to(query.dtype).transpose(1, 2)


def read_fraction(visible: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
    """The ``density`` a bounded call records: keys read over causal keys, a 0-d tensor (no host sync)."""
    reads = visible.float().sum(-1).mean(1)  # [B, Tq]
    causal = (query_positions + 1).clamp(min=1).float()
    real = (query_positions >= 0).float()
    return ((reads / causal) * real).sum() / real.sum().clamp(min=1.0)


# ---- sink + window (streaming, duo's streaming heads) ---------------------------------------------------------
def query_blocks(query_positions: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first position, diagonal block) ``[B, Tq]`` of the query block of each new row, as the masked path places
    them for a row alone: query blocks aligned to the call's first query, or (one query block: a decode step)
    widened back to its block's start (``BlockGeometry.prefill_aligned``)."""
    q_len = query_positions.shape[1]
    offset = query_positions[:, :1]  # [B, 1]
    row = torch.arange(q_len, device=query_positions.device)
    index = row // block
    first = offset + index * block
    last = offset + torch.clamp((index + 1) * block, max=q_len) - 1
    if q_len <= block:  # one query block: widened to its block's start when it stays one block
        widened = offset - offset % block
        first = torch.where(q_len + offset % block <= block, widened, first)
    return first, torch.div(last, block, rounding_mode="floor")


def sink_window_visible(query_positions, positions, block: int, sink_tokens: int, window: int) -> torch.Tensor:
    """bool ``[B, 1, Tq, S]``: the slots each new row reads under ``sink_and_window_runs`` (whole blocks, causal
    within them), from the slots' positions: what the masked path reads, wherever the slots sit."""
    first, diagonal = query_blocks(query_positions, block)
    runs = sink_and_window_runs(diagonal[:, None, :, None], first[:, None, :, None], block, sink_tokens, window)
    key_block = torch.div(positions, block, rounding_mode="floor")[:, :, None, :]
    reads = runs[0].members(key_block) | runs[1].members(key_block)
    return reads & causal_slots(query_positions, positions)


def sink_window_capacity(block: int, sink_tokens: int, window: int) -> int:
    """Most slots ``sink_window_keep`` ever keeps, plus the new token: the sink blocks, and from the window's lowest
    block (at most ``window + block - 2`` below a block start) to the next position (at most ``block - 1`` above)."""
    return math.ceil(sink_tokens / block) * block + window + 2 * block


def sink_window_keep(query_positions, positions, block: int, sink_tokens: int, window: int) -> torch.Tensor:
    """bool like ``positions``: slots a later query may read.  The next query block starts no earlier than the
    block of the next position, so its window's lowest block bounds every later one's (windows only move up)."""
    following = query_positions[:, -1:] + 1  # [B, 1]
    first = following - following % block
    sinks = math.ceil(sink_tokens / block)
    recent = torch.clamp(torch.div(first - window + 1, block, rounding_mode="floor"), min=sinks)
    keep = (positions < sinks * block) | (positions >= (recent * block)[:, :, None])
    return keep & (positions >= 0)
