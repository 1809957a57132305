"""Bounded KV memory: a transformers ``Cache`` that frees the keys a patched method will never read again.

    cache = patchattn.bounded_cache(model)          # after patchattn.patch(model, "streaming", window=...)
    model.generate(**inputs, past_key_values=cache, max_new_tokens=...)

Methods that bound their reads register a plan (``methods._kept.BOUNDED_PLANS``): ``streaming`` keeps its sink
blocks and its window's blocks, ``duo`` the retrieval heads at full length and the streaming heads' sink + window,
``sinklora`` with ``kv_budget`` the ``kv_budget`` keys H2O keeps per KV head.  Each layer stores *slots*: the kept
keys with the position of each (counted from the row's first real token, so a left-padded batch counts every
row's sinks from its own start, as the masked path does).  On each call the layer hands the method its slots and
the new tokens' positions (``methods._kept.KeptKeys``, on the layer's method state); the method attends over the
slots it would read and answers which slots a later query may still read; the layer frees the rest.

Keys are cached after RoPE, so kept keys keep their original rotary positions (DuoAttention's and H2O's code; the
StreamingLLM paper re-numbers positions inside its cache): this is what makes the generated tokens equal to those
of the same method on transformers' default cache.

Sliding-window layers of the model and the method's ``dense_layers`` keep transformers' own layers.  A prefill counts
each row from its first real token as the attention mask gives it (``_rows``), else from the ``position_ids``
transformers passes to ``Cache.update`` (left padding: the first real token is position 0), else from the first
token.  ``static=True`` keeps the slots in fixed-size buffers whose decode step compiles whole.

Linear layers (``lightning``, ``hybrid``'s lightning layers) keep no keys at all: a ``LinearStateLayer`` holds the
layer's recurrent state (``[B, Hq, F, E]``, fixed size) and hands it to the method each call (``LinearCarry``);
the layer gets this call's keys alone and stores its state after the call.  ``hybrid``'s softmax layers keep
transformers' full layers.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    Cache,
    CacheLayerMixin,
    StaticLayer,
    get_layer_types_and_kwargs,
)

from ..methods._kept import BOUNDED_PLANS, KeptKeys, SlotGroup, SlotPlan, compaction, publish
from ..methods._lightning import LightningState, LinearCarry, publish_carry
from ..state import get_state
from .hf import loaded_patch


class _PatchedLayer(CacheLayerMixin):
    """What every bounded-cache layer shares: the patched attention module it serves (its state must not change
    under the cache) and transformers' lazy initialisation."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.state = get_state(module)
        self.seen = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device = key_states.device
        self.batch_size = key_states.shape[0]
        self.is_initialized = True

    def _start_update(self, key_states, value_states) -> None:
        if get_state(self.module) is not self.state:
            raise RuntimeError("patchattn.bounded_cache: the model was re-patched or unpatched since this cache was "
                               "made; make a new cache with patchattn.bounded_cache(model)")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)


class BoundedLayer(_PatchedLayer):
    """One layer's slots, per group of KV heads (``SlotPlan``); ``get_seq_length`` counts every token seen (RoPE
    and the mask need the sequence's length), the slots hold what is kept."""

    def __init__(self, module, plan: SlotPlan):
        super().__init__(module)
        self.plan = plan
        self.start: torch.Tensor | None = None  # [B] first real token of each row
        self.groups: list[SlotGroup] = []

    def update(self, key_states, value_states, *args, **kwargs):
        self._start_update(key_states, value_states)
        q_len = key_states.shape[2]
        if self.seen == 0:
            self.start = row_starts(_position_ids(kwargs), key_states.shape[0], q_len, key_states.device)
        steps = torch.arange(q_len, device=key_states.device) + self.seen
        positions = steps[None, :] - self.start[:, None]
        positions = positions.masked_fill(positions < 0, -1)  # left padding: never read, never kept
        plain = self.seen == 0
        self.groups = [self._extend(g, heads, key_states, value_states, positions, plain)
                       for g, heads in enumerate(self.plan.groups)]
        self.seen += q_len
        publish(self.state.method_state,
                KeptKeys(tuple(self.groups), positions, plain, self.retain, self.recount, self.plan))
        if plain:
            return key_states, value_states
        return self._returned(key_states)

    def recount(self, start: torch.Tensor) -> torch.Tensor:
        """A plain call (its slots are the tokens ``0..T-1``): positions counted from ``start`` instead."""
        self.start = start.to(self.start.device)
        steps = torch.arange(self.seen, device=self.start.device)
        positions = steps[None, :] - self.start[:, None]
        positions = positions.masked_fill(positions < 0, -1)
        for group in self.groups:
            group.positions = positions[:, None, :].expand(-1, group.positions.shape[1], -1)
        return positions

    def _extend(self, g: int, heads, key_states, value_states, positions, plain: bool) -> SlotGroup:
        every = len(heads) == key_states.shape[1]
        keys = key_states if every else key_states[:, list(heads)]
        values = value_states if every else value_states[:, list(heads)]
        new_positions = positions[:, None, :].expand(-1, len(heads) if self.plan.per_head else 1, -1)
        if plain:
            return SlotGroup(heads, keys, values, new_positions)
        old = self.groups[g]
        return SlotGroup(heads, torch.cat([old.keys, keys], dim=2), torch.cat([old.values, values], dim=2),
                         torch.cat([old.positions, new_positions], dim=2))

    def _returned(self, key_states):
        """The keys/values transformers passes to the attention: the slots when one group holds every head in
        order, else a stand-in of the right shape and no memory (zero strides) (the method reads the groups from ``KeptKeys``)."""
        if len(self.groups) == 1 and self.groups[0].kv_heads == tuple(range(key_states.shape[1])):
            return self.groups[0].keys, self.groups[0].values
        batch, heads, _, dim = key_states.shape
        width = max(g.keys.shape[2] for g in self.groups)
        dim_v = self.groups[0].values.shape[-1]
        stand_in = key_states.new_zeros(())
        return stand_in.expand(batch, heads, width, dim), stand_in.expand(batch, heads, width, dim_v)

    def retain(self, keeps) -> tuple[torch.Tensor, ...]:
        """Keep, per group, the slots ``keeps[g]`` marks (bool ``[B, 1 or h, S]``); returns each group's gather
        index (``[B, 1 or h, S']``) so the method can compact its own per-slot state the same way."""
        indices, groups = [], []
        for group, keep in zip(self.groups, keeps):
            keep = keep.expand(-1, group.positions.shape[1], -1)
            if bool(keep.all()):  # nothing freed (duo's retrieval heads): no copy
                groups.append(group)
                indices.append(torch.arange(keep.shape[-1], device=keep.device).expand(keep.shape))
                continue
            order, valid = compaction(keep)
            positions = torch.gather(group.positions, 2, order).masked_fill(~valid, -1)
            heads = group.keys.shape[1]
            take = order.expand(-1, heads, -1)[..., None]
            groups.append(SlotGroup(group.kv_heads,
                                    torch.gather(group.keys, 2, take.expand(-1, -1, -1, group.keys.shape[-1])),
                                    torch.gather(group.values, 2, take.expand(-1, -1, -1, group.values.shape[-1])),
                                    positions))
            indices.append(order)
        self.groups = groups
        return tuple(indices)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The mask of the whole sequence, as a dynamic layer's: the mask is shared with the model's unbounded layers,
        # and a bounded call reads its slots' positions instead.
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def slots(self) -> int:
        """Slots held (per row and head, the widest group): what this layer's memory grows with."""
        return max((g.keys.shape[2] for g in self.groups), default=0)

    def held(self) -> int:
        """Key vectors held per row, over the KV heads (a full layer holds ``heads x tokens``)."""
        return sum(g.keys.shape[1] * g.keys.shape[2] for g in self.groups)

    def reset(self) -> None:
        self.groups, self.seen, self.start = [], 0, None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a bounded KV cache has freed keys: it cannot be cropped (assisted decoding)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        pick = indices.to(self.device) if torch.is_tensor(indices) else indices
        self.groups = [SlotGroup(g.kv_heads, g.keys[pick], g.values[pick], g.positions[pick]) for g in self.groups]
        if self.start is not None:
            self.start = self.start[pick]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.groups = [SlotGroup(g.kv_heads, *(t.repeat_interleave(repeats, 0) for t in (g.keys, g.values,
                                                                                          g.positions)))
                       for g in self.groups]
        if self.start is not None:
            self.start = self.start.repeat_interleave(repeats, 0)


class LinearStateLayer(_PatchedLayer):
    """A linear-attention layer's cache: no keys, the recurrent state after every token seen (``LinearCarry``), so its
    memory does not grow with the context.  Beam search reorders the state's rows; cropping (assisted decoding)
    cannot be undone from a state and raises."""

    def __init__(self, module):
        super().__init__(module)
        self.kv: torch.Tensor | None = None  # [B, Hq, F, E] float32

    def update(self, key_states, value_states, *args, **kwargs):
        self._start_update(key_states, value_states)
        publish_carry(self.state.method_state, LinearCarry(self.seen, self.kv, self._store))
        self.seen += key_states.shape[2]
        return key_states, value_states

    def _store(self, kv: torch.Tensor) -> None:
        self.kv = kv

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0  # the whole sequence's mask, shared with full softmax layers

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def slots(self) -> int:
        return 0

    def reset(self) -> None:
        self.seen, self.kv = 0, None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a linear layer's bounded cache keeps a recurrent state, not keys: it cannot be "
                                  "cropped (assisted decoding); use the default cache")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.kv is not None:
            self.kv = self.kv[indices.to(self.kv.device) if torch.is_tensor(indices) else indices]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.kv is not None:
            self.kv = self.kv.repeat_interleave(repeats, 0)


class StaticBoundedLayer(BoundedLayer):
    """A ``BoundedLayer`` in fixed-size buffers: per group, ``capacities[g]`` slots per row (the plan's bound, or
    ``max_cache_len`` for a group that keeps every key), each with the position it holds (-1: free).  A decode step
    writes its token into each row's first free slot and frees what the method no longer reads by marking slots, all
    on the device with static shapes, so the step compiles whole (``torch.compile(fullgraph=True)``) and can be
    captured in a CUDA graph.  A prefill (or a multi-token call) is eager: it compacts what it keeps into the
    buffers."""

    is_compileable = True

    def __init__(self, module, plan: SlotPlan, capacities: tuple[int, ...], mask_length: int | None = None):
        super().__init__(module, plan)
        self.capacities = capacities
        # The mask transformers builds is shared by every full-attention layer: beside static layers of
        # ``max_cache_len`` it must have their size (the method reads slot positions, not the mask).
        self.mask_length = mask_length
        self.filled = False  # a host flag set by the (eager) prefill: a decode step only reads it
        self.cumulative = torch.zeros((), dtype=torch.long)
        self.buffers: list[SlotGroup] | None = None

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.filled or key_states.shape[2] > 1:
            if self.filled and self.plan.per_head:
                raise NotImplementedError("a static H2O cache takes one token per call after the prefill (its "
                                          "per-slot mass lives at the buffer's width); use static=False")
            if self.filled:  # a multi-token call: the buffers' slots are its past (eager)
                self.groups = [_filled(buffer) for buffer in self.buffers]
                self.seen = int(self.cumulative)
            keys, values = super().update(key_states, value_states, *args, **kwargs)
            self.state.method_state.kept_keys.slots = self.capacities
            self.cumulative = torch.tensor(self.seen, dtype=torch.long, device=key_states.device)
            return keys, values
        if get_state(self.module) is not self.state:
            raise RuntimeError("patchattn.bounded_cache: the model was re-patched or unpatched since this cache was "
                               "made; make a new cache with patchattn.bounded_cache(model)")
        position = (self.cumulative - self.start)[:, None]  # [B, 1]
        every = len(self.buffers) == 1
        for buffer in self.buffers:
            heads = slice(None) if every else list(buffer.kv_heads)
            _write_first_free(buffer, key_states[:, heads], value_states[:, heads], position)
        self.cumulative.add_(1)
        publish(self.state.method_state, KeptKeys(tuple(self.buffers), position, False, self._free, None, self.plan,
                                                  self.capacities, in_place=True))
        # The method reads the slots from KeptKeys; transformers gets the new token alone as a stand-in, so no layer
        # above reads a mask over the buffers (a one-key call is causal as it stands: nothing to cut on the host).
        return key_states, value_states

    def _free(self, keeps) -> tuple[torch.Tensor, ...]:
        """Decode: the slots not kept become free (their keys stay until overwritten)."""
        for buffer, keep in zip(self.buffers, keeps):
            buffer.positions.masked_fill_(~keep, -1)
        return tuple(torch.arange(b.positions.shape[-1], device=b.positions.device).expand(k.shape)
                     for b, k in zip(self.buffers, keeps))

    def retain(self, keeps) -> tuple[torch.Tensor, ...]:
        """Eager calls: compact as the dynamic layer does, then copy into the buffers (allocated on first use)."""
        indices = super().retain(keeps)
        for group, capacity in zip(self.groups, self.capacities):
            if group.keys.shape[2] > capacity - 1:
                raise RuntimeError(f"patchattn static bounded cache: {group.keys.shape[2]} keys kept for "
                                   f"{capacity} slots; raise max_cache_len (prompt + new tokens)")
        if self.buffers is None:
            self.buffers = [_empty_buffer(group, capacity) for group, capacity in zip(self.groups, self.capacities)]
        for buffer, group in zip(self.buffers, self.groups):
            held = group.keys.shape[2]
            buffer.keys[:, :, :held] = group.keys
            buffer.values[:, :, :held] = group.values
            buffer.positions.fill_(-1)
            buffer.positions[:, :, :held] = group.positions
        self.groups = []
        self.filled = True
        return indices

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.mask_length is not None:
            return self.mask_length, 0
        # A decode step hands transformers the new token alone (``update``): its mask covers that one key.
        return (1, 0) if self.filled and query_length == 1 else super().get_mask_sizes(query_length)

    def get_seq_length(self):
        return self.cumulative if self.filled else self.seen

    def get_max_length(self) -> int:
        return max(self.capacities)

    def slots(self) -> int:
        return max(self.capacities) if self.buffers is not None else super().slots()

    def held(self) -> int:
        if self.buffers is None:
            return super().held()
        return sum(b.keys.shape[1] * b.keys.shape[2] for b in self.buffers)

    def reset(self) -> None:
        super().reset()
        self.filled, self.buffers = False, None
        self.cumulative = torch.zeros((), dtype=torch.long)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a static bounded cache keeps its batch (beam search: use static=False)")

    batch_repeat_interleave = reorder_cache = batch_select_indices


def _write_first_free(buffer: SlotGroup, keys, values, position) -> None:
    """The new token into each row's first free slot, in place (static shapes, no host sync)."""
    free = torch.argmax((buffer.positions < 0).to(torch.int32), dim=-1)  # [B, 1 or h]
    heads, dim, dim_v = buffer.keys.shape[1], buffer.keys.shape[-1], buffer.values.shape[-1]
    slot = free[:, :, None, None]
    buffer.keys.scatter_(2, slot.expand(-1, heads, 1, dim), keys)
    buffer.values.scatter_(2, slot.expand(-1, heads, 1, dim_v), values)
    buffer.positions.scatter_(2, free[:, :, None], position[:, None, :].expand(-1, free.shape[1], -1))


def _filled(buffer: SlotGroup) -> SlotGroup:
    """A buffer's filled slots, compacted (eager)."""
    order, valid = compaction(buffer.positions >= 0)
    take = order.expand(-1, buffer.keys.shape[1], -1)[..., None]
    return SlotGroup(buffer.kv_heads, torch.gather(buffer.keys, 2, take.expand(-1, -1, -1, buffer.keys.shape[-1])),
                     torch.gather(buffer.values, 2, take.expand(-1, -1, -1, buffer.values.shape[-1])),
                     torch.gather(buffer.positions, 2, order).masked_fill(~valid, -1))


def _empty_buffer(group: SlotGroup, capacity: int) -> SlotGroup:
    batch, heads, _, dim = group.keys.shape
    buffer = SlotGroup(group.kv_heads, group.keys.new_zeros(batch, heads, capacity, dim),
                       group.values.new_zeros(batch, heads, capacity, group.values.shape[-1]),
                       torch.full((batch, group.positions.shape[1], capacity), -1, dtype=torch.long,
                                  device=group.keys.device))
    for tensor in (buffer.keys, buffer.values, buffer.positions):
        torch._dynamo.mark_static_address(tensor)
    return buffer


def _position_ids(kwargs) -> torch.Tensor | None:
    """The ``position_ids`` transformers passes to ``Cache.update`` (inside ``kwargs=``), if any."""
    inner = kwargs.get("kwargs") or {}
    position_ids = inner.get("position_ids", kwargs.get("position_ids"))
    if position_ids is not None and position_ids.ndim == 3:  # M-RoPE: [axes, B, T]; the text axis counts tokens
        position_ids = position_ids[0]
    return position_ids


def row_starts(position_ids, batch: int, q_len: int, device) -> torch.Tensor:
    """``[B]`` first real token of each row of a prefill: its last token is real (left padding) and sits at
    ``position_ids[:, -1]`` from the row's start."""
    if position_ids is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    last = position_ids[:, -1].to(device=device, dtype=torch.long).expand(batch)
    return (q_len - 1 - last).clamp(min=0)


class BoundedCache(Cache):
    """A transformers ``Cache`` whose patched layers keep only what the method can still read (``bounded_cache``)."""

    def nbytes(self) -> int:
        """Bytes of keys and values held by every layer (what a dense cache's ``2 x layers x heads x tokens x dim``
        is compared with); a linear layer's recurrent state counts as what it holds."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, StaticBoundedLayer) and layer.buffers is not None:
                tensors = [t for b in layer.buffers for t in (b.keys, b.values)]
            elif isinstance(layer, BoundedLayer):
                tensors = [t for g in layer.groups for t in (g.keys, g.values)]
            elif isinstance(layer, LinearStateLayer):
                tensors = [layer.kv]
            else:
                tensors = [getattr(layer, "keys", None), getattr(layer, "values", None)]
            tensors = [t for t in tensors if torch.is_tensor(t)]
            total += sum(t.numel() * t.element_size() for t in tensors if t.ndim == 4)
        return total

    def slots(self) -> list[int]:
        """Per layer, the key slots held per row and KV head (unbounded layers: their cached length)."""
        return [layer.slots() if isinstance(layer, (BoundedLayer, LinearStateLayer)) else _held(layer)
                for layer in self.layers]


def _held(layer) -> int:
    keys = getattr(layer, "keys", None)
    return keys.shape[-2] if torch.is_tensor(keys) and keys.ndim == 4 else 0


def bounded_cache(model, *, static: bool = False, max_cache_len: int | None = None) -> BoundedCache:
    """A KV cache for ``model.generate(..., past_key_values=cache)`` that frees the keys the model's patch will never
    read again (``streaming``, ``duo``, ``sinklora`` with ``kv_budget``), or keeps only the recurrent state of a
    linear layer (``lightning``, ``hybrid``'s lightning layers; its softmax layers keep every key); ValueError for
    other methods.

    ``static=True``: fixed-size buffers (``StaticBoundedLayer``) whose decode step compiles with ``fullgraph=True``;
    heads that keep every key (duo's retrieval heads, a dense layer) get ``max_cache_len`` slots (prompt + new
    tokens, as transformers' static cache)."""
    text_config = model.config.get_text_config(decoder=True)
    modules = _patched_attention(model)
    if not modules and loaded_patch(model) is not None:
        raise ValueError("patchattn.bounded_cache: this model runs a patchattn method through its config (loaded "
                         "patched) and has no patch states yet; call patchattn.get_handle(model) first")
    if not modules:
        raise ValueError("patchattn.bounded_cache: this model is not patched; patch it first, e.g. "
                         "patchattn.patch(model, 'streaming', window=1024)")
    query_heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or query_heads
    layer_types, layer_kwargs = get_layer_types_and_kwargs(text_config)
    if isinstance(layer_kwargs, dict):  # transformers 5.17: one dict for every layer (later: one per layer)
        layer_kwargs = [layer_kwargs] * len(layer_types)
    layers = []
    for index, (kind, kwargs) in enumerate(zip(layer_types, layer_kwargs, strict=True)):
        module = modules.get(index)
        linear = module is not None and isinstance(get_state(module).method_state, LightningState)
        if linear and static:
            raise ValueError(f"patchattn.bounded_cache(static=True): {_method(module)!r} decodes from a recurrent "
                             "state on the host and does not compile; use bounded_cache(model) (static=False)")
        if linear and kind != "full_attention":
            raise ValueError(f"patchattn.bounded_cache: layer {index} of this model is a sliding-window layer, which "
                             f"{_method(module)!r} runs as a full-length linear layer; only models whose layers are "
                             "all full attention are supported")
        if linear:
            softmax = get_state(module).method_state.softmax  # hybrid's softmax layers keep every key
            layers.append(DYNAMIC_LAYER_TYPE_MAPPING[kind](**kwargs) if softmax else LinearStateLayer(module))
            continue
        plan = _plan(module, kv_heads, query_heads) if module is not None and kind == "full_attention" else None
        if plan is None:
            if static and kind == "full_attention":
                if max_cache_len is None:
                    raise ValueError(f"patchattn.bounded_cache(static=True): layer {index} keeps every key (a dense "
                                     "layer or only retrieval heads); give max_cache_len (prompt + new tokens)")
                layers.append(StaticLayer(max_cache_len=max_cache_len))
            else:
                layers.append(DYNAMIC_LAYER_TYPE_MAPPING[kind](**kwargs))
        elif static:
            layers.append(StaticBoundedLayer(module, plan, _capacities(module, plan, max_cache_len)))
        else:
            layers.append(BoundedLayer(module, plan))
    if any(isinstance(layer, StaticLayer) for layer in layers):  # they share the full-attention mask
        for layer in layers:
            if isinstance(layer, StaticBoundedLayer):
                layer.mask_length = max_cache_len
    return BoundedCache(layers=layers)


def _capacities(module, plan: SlotPlan, max_cache_len: int | None) -> tuple[int, ...]:
    if None in plan.capacity and max_cache_len is None:
        raise ValueError(f"patchattn.bounded_cache(static=True): {_method(module)!r} keeps some heads whole; give "
                         "max_cache_len (prompt + new tokens), as for transformers' static cache")
    return tuple(max_cache_len + 1 if c is None else c for c in plan.capacity)


def _method(module) -> str:
    return type(get_state(module).config).method


def _patched_attention(model) -> dict:
    """The patched text attention modules by layer index."""
    found = {}
    for module in model.modules():
        state = get_state(module)
        if state is not None and state.role == "text":
            found[getattr(module, "layer_idx", state.layer_index)] = module
    return found


LINEAR_METHODS = ("hybrid", "lightning")  # a recurrent state per linear layer (``LinearStateLayer``)


def _plan(module, kv_heads: int, query_heads: int) -> SlotPlan | None:
    state = get_state(module)
    method = type(state.config).method
    plan = BOUNDED_PLANS.get(method)
    if plan is None:
        raise ValueError(f"patchattn.bounded_cache: {method!r} may read any earlier key, so its KV memory cannot be "
                         f"bounded; methods that can: {', '.join(sorted([*BOUNDED_PLANS, *LINEAR_METHODS]))}")
    return plan(state, kv_heads, query_heads)
