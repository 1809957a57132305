"""``duo`` — retrieval heads read everything, the other heads stream (sink + recent window).

Retrieval heads (Wu et al., "Retrieval Head Mechanistically Explains Long-Context Factuality", arXiv 2404.15574) are
the few heads that copy-paste from the context; DuoAttention (Xiao et al., arXiv 2410.10819) keeps full attention on
them and gives every other head StreamingLLM's sink + recent window.  Here the heads are chosen from per-query-head
retrieval scores saved by ``python -m patchattn.calibrate.retrieval_heads`` (JSON ``{"model", "num_layers",
"num_heads", "scores": [[...]], "meta"}``): the top ``retrieval_fraction`` of all heads of the model, ranked
globally as DuoAttention thresholds its gates, read every causal block; the rest read the sink and the window.

``scores="auto"`` (default) uses the shipped scores calibrated on this exact architecture (SmolLM2-135M:
``smollm2_retrieval``).  For any other model it warns and falls back to *layer order* (every score equal, ties
go to earlier layers: the first ``retrieval_fraction`` of the heads stay full, as HiP/DuoAttention keep early
layers dense) — an uncalibrated default that only exists so the method runs everywhere; calibrate for real use.

Heads are decided per KV head by default (``kv_heads_together``), as DuoAttention gates GQA models: a KV head ranks
by its best query head's score and its whole query group is full or streaming, so the group shares its lists and a
decode step reads each KV block once (H200, 128k: 1.94x / 3.23x SDPA at batch 1 / 8 against 1.31x / 1.64x per query
head; SmolLM2 8k: x1.129 vs x1.152 perplexity at the same density, ``bench/quality/smollm2_duo_kv.json``).

With ``patchattn.bounded_cache(model)`` the memory follows DuoAttention's: the KV heads a full query head reads keep
every key, the others only their sink + window (``methods._kept``; kept keys keep their rotary positions).

Deviations: heads are chosen from retrieval scores (the Retrieval Head paper) rather than DuoAttention's optimised
gates; ``kv_heads_together=False`` decides per query head; block-granular sink/window as in ``streaming``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..artifacts import check_against, load_artifact, shipped_for
from ..config import option
from ..masks import BlockGeometry, causal_allowed, rows_lists, sink_and_window, sink_and_window_device_rows
from ..registry import register_method
from ..state import PatchState
from ._budget import capped_rows, closest_budget, pattern_density, window_for_blocks
from ._kept import (
    KeptKeys,
    SlotPlan,
    attend_slots,
    bounded_or_sparse,
    causal_slots,
    check_fixed_window,
    read_fraction,
    register_bounded,
    sink_window_capacity,
    sink_window_keep,
    sink_window_visible,
)
from ._shared import per_head_window_lists
from ._sparse import SparseConfig, SparseState, decode_width

AUTO = "auto"
HOW_TO = ("make scores with `python -m patchattn.calibrate.retrieval_heads --model <name or path> --out scores.json` "
          "and pass scores='scores.json'")


@dataclass(kw_only=True)
class DuoConfig(SparseConfig):
    scores: str = option(AUTO, "retrieval-head scores: 'auto' (shipped scores of this model, else layer order with "
                         "a warning), a shipped name ('smollm2_retrieval') or a path to a scores JSON")
    retrieval_fraction: float = option(0.25, "fraction of all heads kept full (DuoAttention: 0.25 MHA, 0.5 GQA)",
                                       min=0.0, max=1.0)
    sink_tokens: int = option(64, "streaming heads: initial tokens attended (DuoAttention eval: 64)", min=0)
    window: int = option(256, "streaming heads: recent tokens attended (DuoAttention eval: 256)", min=1)
    kv_heads_together: bool = option(True, "decide per KV head, as DuoAttention gates GQA models: a KV head is "
                                     "full when its best query head's score ranks it in, so a GQA group shares its "
                                     "lists and reads each KV block once (decoding); retrieval_fraction then counts "
                                     "KV heads")

    DENSE_EQUIVALENT: ClassVar[dict] = {"retrieval_fraction": 1.0}
    DENSITY_FIELDS: ClassVar[tuple] = ("window",)

    def validate(self) -> None:
        if self.scores != AUTO:
            load_scores(self.scores)
        if self.density is not None and self.retrieval_fraction >= self.density and self.density < 1.0:
            raise ValueError(f"duo: density {self.density} is not above retrieval_fraction {self.retrieval_fraction} "
                             "(its full heads alone read that share); lower retrieval_fraction too")

    def fields_for_density(self, density: float, geometry: BlockGeometry) -> dict:
        """The streaming heads' window (the retrieval share is kept: it is calibrated) so that the model's mean reads
        ``density``: ``retrieval_fraction`` of the heads read every block, the others ``min(i + 1, sinks + recent)``
        in row ``i``; closed form.  Retrieval heads are placed globally, so a single layer may read more or less."""
        n, sinks, full = geometry.n_k, math.ceil(self.sink_tokens / geometry.block_k), self.retrieval_fraction

        def reads(recent):
            stream = pattern_density(capped_rows(n, sinks + recent), min(n, sinks + recent), n, self.last_block_dense)
            return full + (1.0 - full) * stream

        return {"window": window_for_blocks(closest_budget(reads, density, 1, n), geometry.block_k)}


@dataclass
class DuoState(SparseState):
    """The layer's retrieval heads (bool ``[heads]``, per KV head with ``kv_heads_together``; on the host, where
    decoding reads them), chosen once when patching, and their copy on the queries' device."""

    retrieval: torch.Tensor | None = None
    retrieval_on: torch.Tensor | None = None
    kept_keys: KeptKeys | None = None  # the slots a bounded KV cache hands the current call (methods._kept)

    def shard_heads(self, shard) -> None:
        if self.retrieval is not None:  # [heads] or, with kv_heads_together, [kv_heads]: the size says which
            self.retrieval = shard.local(self.retrieval).clone()


def load_scores(name_or_path: str) -> dict:
    """A retrieval-score JSON, checked: ``scores`` is ``[num_layers][num_heads]`` numbers."""
    data = load_artifact(name_or_path, "scores", "retrieval scores")
    for layer, row in enumerate(data["scores"]):
        for head, score in enumerate(row):
            if isinstance(score, bool) or not isinstance(score, (int, float)):  # a bad file: ValueError, as the rest
                raise ValueError(  # noqa: TRY004
                    f"retrieval scores {name_or_path!r}: scores[{layer}][{head}] (layer {layer}, head {head}) is "
                    f"{score!r}; allowed: a finite number (higher = more of a retrieval head)")
    return data


def model_scores(config: DuoConfig, model_config) -> torch.Tensor:
    """``[num_layers, num_heads]`` scores for this model (see the module docstring for ``auto``)."""
    name = config.scores
    if name == AUTO:
        name = shipped_for(model_config, "scores")
    if name is None:
        warnings.warn(f"patchattn duo: no retrieval-head scores for this model; using layer order (uncalibrated). "
                      f"To calibrate, {HOW_TO}", stacklevel=2)
        return torch.zeros(model_config.num_hidden_layers, model_config.num_attention_heads)
    data = load_scores(name)
    check_against(data, model_config, "retrieval scores")
    return torch.tensor(data["scores"], dtype=torch.float64)


def retrieval_heads(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """bool ``[L, H]``: the top ``fraction`` of all heads by score (stable: ties go to earlier layers and heads)."""
    count = round(fraction * scores.numel())
    order = torch.sort(scores.flatten(), descending=True, stable=True).indices
    chosen = torch.zeros(scores.numel(), dtype=torch.bool)
    chosen[order[:count]] = True
    return chosen.view_as(scores)


def make_duo_state(module, config, layer_index, role, context) -> PatchState:
    """Choose the layer's retrieval heads once, when patching (the choice is global over all layers)."""
    model_config = getattr(module, "config", None)
    if model_config is None:
        raise ValueError(f"duo needs the attention module's model config to place its heads; {type(module).__name__} "
                         "has none")
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    if config.retrieval_fraction >= 1.0:  # every head full: no scores needed
        retrieval = torch.ones(kv_heads if config.kv_heads_together else heads, dtype=torch.bool)
    else:
        scores = model_scores(config, model_config)
        if config.kv_heads_together:  # a KV head ranks by its best query head
            scores = scores.view(scores.shape[0], kv_heads, heads // kv_heads).amax(-1)
        retrieval = retrieval_heads(scores, config.retrieval_fraction)[layer_index]
    return PatchState(config, layer_index, role, context, DuoState(retrieval=retrieval))


def select_duo(g, query, key, state):
    config, kept = state.config, state.method_state
    retrieval = kept.retrieval
    if retrieval is None:
        raise ValueError("duo: this layer has no retrieval heads; patch the model with patchattn.patch(model, 'duo')")
    heads = key.shape[1] if config.kv_heads_together else query.shape[1]  # lists per KV head: the group shares them
    if retrieval.shape[0] != heads:
        raise ValueError(f"duo: scores give {retrieval.shape[0]} heads for this layer, the call has {heads}")
    if g.n_q == 1:  # decoding: a full row (a window as long as the cache) or sink + window per head, as lists
        windows = [g.kv_len if full else config.window for full in retrieval.tolist()]
        return per_head_window_lists(g, config.sink_tokens, windows, decode_width(config, g), query.device)
    full = causal_allowed(g, query.device)
    stream = sink_and_window(g, config.sink_tokens, config.window, device=query.device)
    on_device = kept.retrieval_on
    if on_device is None or on_device.device != query.device:
        on_device = kept.retrieval_on = retrieval.to(query.device)  # copied to the device once, not every call
    return torch.where(on_device[:, None, None], full, stream)  # [Hq, NQ, NK]


def decode_rows_duo(rows, query, key, state):
    """Decoding rows of different lengths: a window as long as the cache on retrieval heads, sink + window on the
    rest, built on the device."""
    config, kept = state.config, state.method_state
    heads = key.shape[1] if config.kv_heads_together else query.shape[1]
    if kept.retrieval is None or kept.retrieval.shape[0] != heads:
        return select_duo(rows.geometry(), query, key, state)  # raises the selector's error
    on_device = kept.retrieval_on
    if on_device is None or on_device.device != query.device:
        on_device = kept.retrieval_on = kept.retrieval.to(query.device)
    windows = torch.where(on_device, rows.capacity, config.window).reshape(1, -1, 1)
    runs = sink_and_window_device_rows(rows, config.sink_tokens, windows)
    return rows_lists(runs, decode_width(config, rows.geometry()), query.device)


# ---- bounded KV memory (patchattn.bounded_cache) ----------------------------------------------------------------
def _bounded_plan(state, kv_heads: int, query_heads: int):
    """Two groups of KV heads: those a full query head reads (kept whole) and the streaming ones (sink + window).
    Which query heads read everything is fixed here, on the host, so a compiled step branches on constants."""
    config = state.config
    check_fixed_window(config)
    retrieval = state.method_state.retrieval
    if retrieval is None:
        raise ValueError("duo: this layer has no retrieval heads; patch the model with patchattn.patch(model, 'duo')")
    flags = [bool(full) for full in retrieval.tolist()]
    per_kv = query_heads // kv_heads
    if config.kv_heads_together:
        full_kv, full_q = flags, tuple(flag for flag in flags for _ in range(per_kv))
    else:  # a KV head is kept whole when any query head of its group is full
        full_kv, full_q = [any(flags[h * per_kv:(h + 1) * per_kv]) for h in range(kv_heads)], tuple(flags)
    full_heads = tuple(h for h in range(kv_heads) if full_kv[h])
    stream_heads = tuple(h for h in range(kv_heads) if not full_kv[h])
    if not stream_heads:  # every head reads every key: transformers' own layer
        return None
    window = sink_window_capacity(config.block_size, config.sink_tokens, config.window)
    groups = tuple(g for g in (full_heads, stream_heads) if g)
    return SlotPlan(groups=groups, capacity=tuple(window if g is stream_heads else None for g in groups),
                    heads_reading_all=full_q)


def _group_keep(state, group, query_positions, full_q: tuple[bool, ...]) -> torch.Tensor:
    """keep ``[B, 1, S]``: the slots the group's heads may still read later (every filled slot when any of its query
    heads reads everything; else the sink + window)."""
    if any(full_q):
        return group.positions >= 0
    config = state.config
    return sink_window_keep(query_positions, group.positions, config.block_size, config.sink_tokens, config.window)


def _group_visible(state, group, query_positions, full_q: tuple[bool, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(visible ``[B, 1 or hq, Tq, S]`` for the group's query heads, keep ``[B, 1, S]``)."""
    config = state.config
    keep = _group_keep(state, group, query_positions, full_q)
    causal = causal_slots(query_positions, group.positions)
    if all(full_q):
        return causal, keep
    stream = sink_window_visible(query_positions, group.positions, config.block_size, config.sink_tokens,
                                 config.window)
    if not any(full_q):
        return stream, keep
    reads_all = torch.tensor(full_q, device=causal.device)[None, :, None, None]
    return torch.where(reads_all, causal, stream), keep


def _group_query_heads(group, per_kv: int) -> list[int]:
    return [kv * per_kv + j for kv in group.kv_heads for j in range(per_kv)]


def _keeps(state, kept: KeptKeys, query_heads: int) -> tuple[torch.Tensor, ...]:
    per_kv = query_heads // sum(len(g.kv_heads) for g in kept.groups)
    full_q = kept.plan.heads_reading_all
    # Only what to keep: the [Tq, S] visibility of a long prefill is never built here (at 128k it was two 17 GB masks
    # per layer: duo's bounded prefill peaked at 105.6 GiB on the H200, bench/generate).
    return tuple(_group_keep(state, g, kept.query_positions, tuple(full_q[h] for h in _group_query_heads(g, per_kv)))
                 for g in kept.groups)


def bounded_call(state, query, kept: KeptKeys, *, scaling, softcap):
    """Each group of heads over its own slots, the outputs put back by query head; ``[B, Tq, Hq, Dv]``."""
    if query.shape[2] > 1 and state.config.last_block_dense:
        raise NotImplementedError("duo: last_block_dense reads every key on a multi-token call, which a bounded cache "
                                  "has evicted; pass last_block_dense=False or use the default cache")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    batch, query_heads, q_len, _ = query.shape
    per_kv = query_heads // sum(len(g.kv_heads) for g in kept.groups)
    full_q = kept.plan.heads_reading_all
    out = query.new_empty(batch, q_len, query_heads, kept.groups[0].values.shape[-1])
    keeps, reads = [], []
    for group in kept.groups:
        heads = _group_query_heads(group, per_kv)
        visible, keep = _group_visible(state, group, kept.query_positions, tuple(full_q[h] for h in heads))
        out[:, :, heads] = attend_slots(query[:, heads], group.keys, group.values, visible, scaling=scaling,
                                        softcap=softcap)
        keeps.append(keep)
        reads.append((len(heads), read_fraction(visible, kept.query_positions)))
    state.record(density=sum(n * fraction for n, fraction in reads) / query_heads)
    kept.retain(tuple(keeps))
    return out


def duo_attention(module, query, key, value, attention_mask, *, scaling=None, **kwargs):
    """Full attention on calibrated retrieval heads, sink + recent window on the other heads."""
    return bounded_or_sparse(module, query, key, value, attention_mask, scaling=scaling, select=select_duo,
                             decode_rows=decode_rows_duo, keeps=_keeps, bounded=bounded_call, **kwargs)


duo_attention = register_method(
    "duo",
    config=DuoConfig,
    category="sparse",
    families=("llm", "lvlm"),
    patterns=("causal-self",),
    make_state=make_duo_state,
    paper="Wu et al., Retrieval Head Mechanistically Explains Long-Context Factuality, arXiv 2404.15574; "
    "Xiao et al., DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads "
    "(ICLR 2025), arXiv 2410.10819",
    select=select_duo,
    key_bounds=True,
    state_cls=DuoState,
    static=True,
)(duo_attention)
register_bounded("duo", _bounded_plan)
