"""``sinklora`` — SinkLoRA's SF-Attn for fine-tuning, and H2O-style KV eviction at inference.

Zhang, "SinkLoRA: Enhanced Efficiency and Chat Capabilities for Long-Context Large Language Models",
arXiv 2406.05678; Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models" (NeurIPS 2023), arXiv 2306.14048.

**SF-Attn (training).**  SinkLoRA starts from LongLoRA's S²-Attn and returns the shifted heads' groups to their
un-shifted positions ("segmentation and reassembly"), so every head attends causally inside the same groups of
``G = N * group_size_ratio`` tokens, and adds global attention to ``sink_tokens`` "sink attention tokens" (the first
tokens of the sequence, StreamingLLM's 4 by default) from every group.  The authors' code has no SF-Attn (spec 8.2),
so this follows the paper's description and the spec's suggestion (8.3): token ``i`` reads key ``j <= i`` iff
``j // G == i // G`` or ``j < sink_tokens``.  On the block-sparse kernel the sinks are exact, not rounded to a
block: the first block of keys is prepended once more in front of the keys (``K' = [K[:S], K]``, ``S`` = sinks
rounded up to a block), its columns past ``sink_tokens`` get a ``-inf`` column bias, and query blocks of groups
after the first read that prepended block plus their own group's blocks (group 0 already holds the sinks).  Query
``i`` sits at key position ``i + S`` of ``K'``, so the kernel's causal rule is unchanged.  The block is the largest
divisor of ``G`` up to ``block_size``; when the Triton kernel does not take it (``G = 25``), the tokens are spread so
that every group starts on a kernel block, the gaps being padding keys under the ``-inf`` bias (``_shared.PieceLayout``).  Gradients reach the sink
keys through both copies.  Runs in training mode only by default (``train_only``), like LongLoRA.

**H2O eviction (inference, ``kv_budget``).**  With ``kv_budget=None`` inference is the model's dense attention,
exactly.  With a budget, each layer keeps at most ``kv_budget`` keys per KV head: the sinks, the ``kv_recent`` most
recent tokens (default half the budget, H2O's equal split) and the heavy hitters, the keys with the largest
accumulated attention mass (attention probabilities summed over every query row so far and over the query heads of
the KV head's group).  What is implemented: a prefill runs dense attention (exact), then its column mass is computed
in chunks of query rows (``q.k`` rows, softmax, column sums; ``O(chunk x N)`` memory) and the cache is cut to the
budget; every later token (decode, or each row of a chunk against the cache) attends only to the kept keys plus
itself, adds its attention row to the accumulated mass, and when a head holds more than the budget the kept key
with the smallest mass outside the sinks and the recent window is evicted, for good.  With transformers' default cache,
eviction is simulated with a mask over the KV cache, as H2O's own Hugging Face code does: quality is that of a
``kv_budget`` cache, memory is not freed; with ``patchattn.bounded_cache(model)`` the evicted keys are freed (each KV
head holds its ``kv_budget`` slots, the same tokens).  Sinks and heavy hitters are per KV head (GQA heads of a group
share their keys).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import option
from ..kernels.blocksparse import block_sparse_attention, density_tensor
from ..registry import register_method
from ._kept import KeptKeys, SlotPlan, register_bounded, take
from ._rows import run_by_rows
from ._shared import (
    GroupedConfig,
    GroupedState,
    cached_group_lists,
    group_size_for,
    grouped_blocks,
    training_attention_active,
)
from ._sparse import dense_call, padding_start, sparse_reason

PAPER = ("Zhang, SinkLoRA: Enhanced Efficiency and Chat Capabilities for Long-Context Large Language Models, "
         "arXiv 2406.05678; inference: Zhang et al., H2O: Heavy-Hitter Oracle (NeurIPS 2023), arXiv 2306.14048")
ROW_CHUNK = 256  # query rows per chunk when measuring a prefill's column mass


@dataclass(kw_only=True)
class SinkLoRAConfig(GroupedConfig):
    sink_tokens: int = option(4, "first tokens every group attends to, and H2O never evicts (StreamingLLM: 4)", min=0)
    kv_budget: int | None = option(None, "inference: keys kept per KV head by H2O eviction (None: dense)", min=1)
    kv_recent: int | None = option(None, "inference: most recent keys always kept (default: half of kv_budget)",
                                   min=0)

    # One group covering the sequence (sinks inside it) is full causal attention, in training mode too.
    DENSE_EQUIVALENT: ClassVar[dict] = {"group_size_ratio": 1.0, "train_only": False}

    def validate(self) -> None:
        super().validate()
        if self.kv_budget is not None and self.sink_tokens + self.recent_window() > self.kv_budget:
            raise ValueError(f"SinkLoRAConfig: sink_tokens ({self.sink_tokens}) + kv_recent ({self.recent_window()}) "
                             f"must fit in kv_budget ({self.kv_budget})")
        if self.kv_budget is None and self.kv_recent is not None:
            raise ValueError("SinkLoRAConfig.kv_recent needs kv_budget (H2O eviction is off without a budget)")

    def recent_window(self) -> int:
        if self.kv_budget is None:
            return 0
        return self.kv_recent if self.kv_recent is not None else self.kv_budget // 2


@dataclass
class H2OCache:
    """H2O's eviction state: which keys each KV head keeps (bool ``[B, Hkv, Tk]``), their accumulated attention
    mass (``[B, Hkv, Tk]``) and the left-padding start of each sequence (``[B]`` or None)."""

    kept: torch.Tensor
    mass: torch.Tensor
    kv_start: torch.Tensor | None = None


@dataclass
class SinkLoRAState(GroupedState):
    """The latest training shape's block lists, and the H2O eviction state at inference."""

    h2o: H2OCache | None = None
    kept_keys: KeptKeys | None = None  # the slots a bounded KV cache hands the current call (methods._kept)


# ---- SF-Attn -----------------------------------------------------------------------------------------------------
def sf_block_mask(seq_len: int, group: int, block: int, sink_blocks: int, device=None,
                  starts: torch.Tensor | None = None) -> torch.Tensor:
    """bool ``[1, 1, NQ, sink_blocks + NK]`` over the keys ``[prepended sinks, K]``: own group (causal) + sinks.

    ``starts``: the token at the start of each block (default every ``block`` tokens; a ``PieceLayout``'s blocks)."""
    if starts is None:
        starts = torch.arange(0, seq_len, block, device=device)
    seg = torch.div(starts, group, rounding_mode="floor")
    own = (seg[:, None] == seg[None, :]) & (starts[None, :] <= starts[:, None])
    sinks = (seg > 0)[:, None].expand(-1, sink_blocks)
    return torch.cat([sinks, own], dim=1)[None, None]


def sf_attention_reference(query, key, value, group: int, sink_tokens: int, *, scale: float | None = None):
    """SF-Attn as a dense masked softmax (tests; O(N^2)): ``j <= i`` and (same group or ``j < sink_tokens``)."""
    seq_len, dim = query.shape[2], query.shape[3]
    group_kv = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group_kv, 1), value.repeat_interleave(group_kv, 1)
    pos = torch.arange(seq_len, device=query.device)
    same = (pos[:, None] // group) == (pos[None, :] // group)
    allowed = (same | (pos[None, :] < sink_tokens)) & (pos[None, :] <= pos[:, None])
    scores = (query @ key.transpose(-1, -2)) * (dim ** -0.5 if scale is None else scale)
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ value


def _sf_attention(state, query, key, value, scaling, softcap):
    config = state.config
    q_len = query.shape[2]
    group = group_size_for(config, q_len)
    if config.sink_tokens > group and group < q_len:  # one group holding the whole sequence reads its sinks anyway
        raise ValueError(f"sinklora: the {config.sink_tokens} sink tokens must fit in the first group "
                         f"({group} tokens); lower sink_tokens or raise group_size")
    block, layout = grouped_blocks(q_len, group, config.block_size)
    key_bias = torch.zeros(key.shape[2], device=query.device, dtype=torch.float32)
    if layout is not None:  # group boundaries off the kernel's blocks: run on tokens spread onto whole blocks
        query, key, value = layout.spread(query), layout.spread(key), layout.spread(value)
        key_bias = layout.key_bias(query.device)
    starts = None if layout is None else layout.block_tokens(query.device)
    length = query.shape[2]
    sink_blocks = -(-config.sink_tokens // block)
    width = sink_blocks * block
    lists_key = (q_len, group, block, sink_blocks, query.device)
    kv_indices, kv_counts = cached_group_lists(
        state, lists_key, lambda: sf_block_mask(q_len, group, block, sink_blocks, query.device, starts))
    # The sinks once more in front, so groups > 0 can read exactly sink_tokens of them (-inf bias on the rest; the
    # first group starts the layout, so those keys are real tokens).
    key_ext = torch.cat([key[:, :, :width], key], dim=2)
    value_ext = torch.cat([value[:, :, :width], value], dim=2)
    sink_bias = torch.zeros(width, device=query.device, dtype=torch.float32)
    sink_bias[config.sink_tokens:] = float("-inf")
    bias = torch.cat([sink_bias, key_bias])[None, None]
    out = block_sparse_attention(query, key_ext, value_ext, kv_indices, kv_counts, block_q=block, block_k=block,
                                 causal=True, scale=scaling, softcap=softcap, col_bias=bias, backend=config.backend)
    state.record(density=density_tensor(kv_counts, length, length + width, block, block, causal=True))
    return out if layout is None else layout.gather(out)


# ---- H2O ---------------------------------------------------------------------------------------------------------
def _scores(query, key, scaling, softcap):
    """``[B, Hq, Tq, Tk]`` fp32 attention logits (GQA keys repeated)."""
    group = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group, 1).float()
    s = (query.float() @ k.transpose(-1, -2)) * scaling
    return softcap * torch.tanh(s / softcap) if softcap is not None else s


def _per_kv_head(x, kv_heads: int):
    """Sum ``[B, Hq, ..., Tk]`` over the query heads of each KV head's group -> ``[B, Hkv, ..., Tk]``."""
    return x.unflatten(1, (kv_heads, -1)).sum(2)


def column_mass(query, key, scaling, softcap=None, kv_start=None) -> torch.Tensor:
    """``[B, Hkv, Tk]`` attention mass each key receives from every (causal) query row of a prefill."""
    q_len, kv_len = query.shape[2], key.shape[2]
    keys = torch.arange(kv_len, device=query.device)
    mass = torch.zeros(query.shape[0], key.shape[1], kv_len, device=query.device)
    for lo in range(0, q_len, ROW_CHUNK):
        rows = torch.arange(lo, min(lo + ROW_CHUNK, q_len), device=query.device) + (kv_len - q_len)
        allowed = (keys[None, :] <= rows[:, None])[None, None]
        if kv_start is not None:
            allowed = allowed & (keys >= kv_start.long()[:, None, None, None])
        s = _scores(query[:, :, lo:lo + ROW_CHUNK], key, scaling, softcap).masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # fully padded rows give no mass
        mass += _per_kv_head(p.sum(2), key.shape[1])
    return mass


def _protected(config, positions: torch.Tensor, newest: torch.Tensor) -> torch.Tensor:
    """bool like ``positions`` (``[B, 1 or Hkv, Tk]``, counted from each row's first real token; -1 or below:
    padding): the sinks and the recent window ending at position ``newest`` (``[B]``)."""
    sinks = (positions >= 0) & (positions < config.sink_tokens)
    return sinks | (positions > newest[:, None, None] - config.recent_window())


def _row_positions(kv_len: int, kv_start, batch: int, device) -> torch.Tensor:
    """``[B, 1, Tk]`` each key's position from its row's first real token (the masked path's keys)."""
    keys = torch.arange(kv_len, device=device)[None, None, :]
    start = torch.zeros(batch, device=device, dtype=torch.long) if kv_start is None else kv_start.long()
    return keys - start[:, None, None]


def _evict_to_budget(config, kept, mass, protected) -> torch.Tensor:
    """Drop the lowest-mass unprotected kept keys of every head holding more than ``kv_budget`` keys."""
    excess = (kept.sum(-1) - config.kv_budget).clamp_min(0)  # [B, Hkv]
    most = int(excess.max())
    if most == 0:
        return kept
    candidate = kept & ~protected
    ranked = mass.masked_fill(~candidate, float("inf")).argsort(dim=-1)[..., :most]
    drop = torch.arange(most, device=kept.device) < excess[..., None]
    evicted = torch.zeros_like(kept).scatter(-1, ranked, drop & torch.gather(candidate, -1, ranked))
    return kept & ~evicted


def _h2o_prefill(state, module, query, key, value, attention_mask, scaling, softcap, kwargs):
    config = state.config
    batch, kv_len = query.shape[0], key.shape[2]
    kv_start = padding_start(attention_mask, batch, kv_len)
    out = dense_call(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    mass = column_mass(query, key, scaling, softcap, kv_start)
    keys = torch.arange(kv_len, device=query.device)
    real = torch.ones(batch, 1, kv_len, dtype=torch.bool, device=query.device)
    if kv_start is not None:
        real = keys[None, None, :] >= kv_start.long()[:, None, None]
    kept = real.expand(-1, key.shape[1], -1).clone()
    positions = _row_positions(kv_len, kv_start, batch, query.device)
    protected = _protected(config, positions, positions[:, 0, -1])
    kept = _evict_to_budget(config, kept, mass, protected)
    state.method_state.h2o = H2OCache(kept, mass, kv_start)
    state.record(density=kept.float().mean())
    return out


def _h2o_state(state, batch: int, kv_heads: int, past: int, device):
    """The eviction state for a cache of ``past`` keys (fresh, with everything kept, if none matches)."""
    h2o = state.method_state.h2o
    if h2o is None or h2o.kept.shape[:2] != (batch, kv_heads) or h2o.kept.shape[2] != past:
        kept = torch.ones(batch, kv_heads, past, dtype=torch.bool, device=device)
        h2o = H2OCache(kept, torch.zeros(batch, kv_heads, past, device=device))
    return h2o


def _h2o_extend(state, query, key, value, scaling, softcap):
    """New rows against the (masked) cache: ``_h2o_rows`` over every key, evicted ones masked."""
    batch, _, q_len, _ = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    past = kv_len - q_len
    h2o = _h2o_state(state, batch, kv_heads, past, query.device)
    positions = _row_positions(kv_len, h2o.kv_start, batch, query.device)
    out, kept, mass = _h2o_rows(state.config, query, key, value, h2o.kept, h2o.mass, positions,
                                positions[:, 0, past:], scaling, softcap)
    state.method_state.h2o = H2OCache(kept, mass, h2o.kv_start)
    state.record(density=kept.float().mean())
    return out


def _h2o_rows(config, query, key, value, kept, mass, positions, newest, scaling, softcap):
    """New rows one at a time: attend to kept keys + self, accumulate mass, evict.  ``key`` ``[B, Hkv, P + Tq, D]``
    (the last ``Tq`` are the new rows' own), ``kept``/``mass`` ``[B, Hkv, P]``, ``positions`` ``[B, 1 or Hkv,
    P + Tq]`` and ``newest`` ``[B, Tq]`` counted from each row's first real token.  Returns ``([B, Tq, Hq, Dv],
    kept, mass)`` over the ``P + Tq`` keys."""
    batch, heads, q_len, _ = query.shape
    kv_heads = key.shape[1]
    past = key.shape[2] - q_len
    outs = []
    for r in range(q_len):
        length = past + r + 1
        kept = torch.cat([kept, kept.new_ones(batch, kv_heads, 1)], dim=-1)
        mass = torch.cat([mass, mass.new_zeros(batch, kv_heads, 1)], dim=-1)
        s = _scores(query[:, :, r:r + 1], key[:, :, :length], scaling, softcap)  # [B, Hq, 1, L]
        visible = kept.repeat_interleave(heads // kv_heads, 1)[:, :, None, :]
        p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)
        v = value[:, :, :length].repeat_interleave(heads // kv_heads, 1).float()
        outs.append(p @ v)
        mass = mass + _per_kv_head(p[:, :, 0], kv_heads)
        protected = _protected(config, positions[..., :length], newest[:, r])
        kept = _evict_to_budget(config, kept, mass, protected)
    return torch.cat(outs, dim=2).to(query.dtype).transpose(1, 2), kept, mass


# ---- bounded KV memory (patchattn.bounded_cache) ----------------------------------------------------------------
def _bounded_plan(state, kv_heads: int, query_heads: int):
    """Every KV head keeps its own ``kv_budget`` keys."""
    if state.config.kv_budget is None:
        raise ValueError("sinklora without kv_budget runs dense attention at inference (it reads every key), so "
                         "memory cannot be bounded; set kv_budget (H2O eviction)")
    return SlotPlan(groups=(tuple(range(kv_heads)),), per_head=True, capacity=(state.config.kv_budget + 1,))


def _compact(h2o: H2OCache, order: torch.Tensor, slots=None) -> H2OCache:
    """The eviction state on the slots the cache kept (``order``: its gather index), at a static buffer's width
    (``slots``) when it has one."""
    kept = torch.gather(h2o.kept, -1, order)
    mass = torch.gather(h2o.mass, -1, order) * kept
    if slots is not None:
        kept = torch.nn.functional.pad(kept, (0, slots[0] - kept.shape[-1]))
        mass = torch.nn.functional.pad(mass, (0, slots[0] - mass.shape[-1]))
    return H2OCache(kept, mass, h2o.kv_start)


def _evict_one(config, kept, mass, protected) -> torch.Tensor:
    """``_evict_to_budget`` for a decode step (a head holds at most one key too many), on the device: no host sync."""
    over = kept.sum(-1, keepdim=True) > config.kv_budget
    candidate = kept & ~protected
    victim = mass.masked_fill(~candidate, float("inf")).argmin(-1, keepdim=True)
    drop = over & torch.gather(candidate, -1, victim)
    return kept & ~torch.zeros_like(kept).scatter(-1, victim, drop)


def _h2o_in_place(state, query, kept_keys: KeptKeys, scaling, softcap):
    """A static cache's decode step: the new token already sits in a free slot; mass and eviction per slot, with
    static shapes and no host sync (the step compiles whole)."""
    config = state.config
    (group,) = kept_keys.groups
    heads, kv_heads = query.shape[1], group.keys.shape[1]
    kept = group.positions >= 0  # [B, Hkv, C]: the kept keys and the new one
    mass = state.method_state.h2o.mass
    s = _scores(query, group.keys, scaling, softcap)  # [B, Hq, 1, C]
    p = torch.softmax(s.masked_fill(~kept.repeat_interleave(heads // kv_heads, 1)[:, :, None, :], float("-inf")), -1)
    out = p @ group.values.repeat_interleave(heads // kv_heads, 1).float()
    mass = mass * kept + _per_kv_head(p[:, :, 0], kv_heads)
    protected = _protected(config, group.positions, kept_keys.query_positions[:, 0])
    kept = _evict_one(config, kept, mass, protected)
    kept_keys.retain((kept,))
    state.method_state.h2o = H2OCache(kept, mass * kept)
    state.record(density=_held_fraction(kept, kept_keys.query_positions))
    return out.to(query.dtype).transpose(1, 2)


def _held_fraction(kept, query_positions) -> torch.Tensor:
    """The density a bounded H2O call records: keys held per head over the keys seen (no host sync)."""
    return kept.float().sum(-1).mean() / (query_positions[:, -1] + 1).clamp(min=1).float().mean()


def _h2o_bounded(state, module, query, key, value, attention_mask, kept_keys: KeptKeys, scaling, softcap, kwargs):
    """H2O on a bounded cache: the slots hold exactly the kept keys, and the evicted ones are freed."""
    if kept_keys.plain:  # a prefill: the masked path, then the cache keeps what it kept
        out, _ = _h2o_prefill(state, module, query, key, value, attention_mask, scaling, softcap, kwargs)
        h2o = state.method_state.h2o
        kept_keys.count_rows_from(attention_mask)
        (order,) = kept_keys.retain((h2o.kept,))
        state.method_state.h2o = _compact(h2o, order, kept_keys.slots)
        return out
    if kept_keys.in_place:
        return _h2o_in_place(state, query, kept_keys, scaling, softcap)
    (group,) = kept_keys.groups
    past = group.keys.shape[2] - query.shape[2]
    kept = group.positions[..., :past] >= 0
    h2o = state.method_state.h2o
    mass = h2o.mass if h2o is not None and h2o.mass.shape == kept.shape else torch.zeros(kept.shape,
                                                                                           device=kept.device)
    out, kept, mass = _h2o_rows(state.config, query, group.keys, group.values, kept, mass, group.positions,
                                kept_keys.query_positions, scaling, softcap)
    (order,) = kept_keys.retain((kept,))
    state.method_state.h2o = _compact(H2OCache(kept, mass), order)
    state.record(density=_held_fraction(state.method_state.h2o.kept, kept_keys.query_positions))
    return out


# ---- attention ---------------------------------------------------------------------------------------------------
@register_method(
    "sinklora",
    config=SinkLoRAConfig,
    category="other",
    families=("llm", "lvlm"),
    needs_finetune=True,
    patterns=("causal-self",),
    paper=PAPER,
    state_cls=SinkLoRAState,
)
def sinklora_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, **kwargs):
    """SinkLoRA SF-Attn in training (groups + global sink tokens); dense or H2O KV eviction at inference."""
    state = module.patchattn
    config = state.config
    q_len, dim = query.shape[2], query.shape[3]
    kv_len = key.shape[2]
    scaling = dim ** -0.5 if scaling is None else scaling
    softcap = kwargs.get("softcap")
    kept_keys = take(state.method_state)
    h2o = config.kv_budget is not None and not module.training and not kwargs.get("sliding_window")
    if kept_keys is not None:
        if not h2o or training_attention_active(module, config, q_len, kv_len):
            raise RuntimeError("sinklora on a bounded KV cache runs H2O eviction only: kv_budget set, eval mode")
        return _h2o_bounded(state, module, query, key, value, attention_mask, kept_keys, scaling, softcap, kwargs), None
    if training_attention_active(module, config, q_len, kv_len):
        reason, spans = sparse_reason(state, attention_mask, q_len, kv_len, kwargs)
        if reason is None:
            def run(q, k, v):  # unpadded rows: groups and sinks count from each row's first token
                return _sf_attention(state, q, k, v, scaling, softcap).transpose(1, 2)

            return (run(query, key, value) if spans is None else run_by_rows(state, query, key, value, spans, run)), None
        if reason != "dense layer":
            warnings.warn(f"patchattn sinklora: {reason}; those calls run dense attention", stacklevel=2)
    elif h2o:
        if q_len == kv_len:
            return _h2o_prefill(state, module, query, key, value, attention_mask, scaling, softcap, kwargs)
        return _h2o_extend(state, query, key, value, scaling, softcap), None
    state.record(density=1.0)
    return dense_call(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


register_bounded("sinklora", _bounded_plan)
