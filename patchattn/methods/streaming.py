"""``streaming`` — attention sinks + a sliding window (StreamingLLM; the sink + window of SinkLoRA).

Each query reads the first ``sink_tokens`` keys (the attention sinks) and the ``window`` most recent keys.
Block-granular: whole ``block_size`` blocks are read, so the sink covers the first block and the window is
rounded up to whole blocks (never less than asked).

With ``patchattn.bounded_cache(model)`` the keys no later query reads are freed: each layer keeps its sink blocks
and its window's blocks (``methods._kept``); kept keys keep their original rotary positions, so the tokens equal
those of the default cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ..config import option
from ..masks import BlockGeometry, rows_lists, sink_and_window, sink_and_window_device_rows, sink_and_window_row
from ..registry import register_method
from ._budget import capped_rows, closest_budget, pattern_density, window_for_blocks
from ._kept import (
    KeptKeys,
    SlotPlan,
    attend_slots,
    bounded_or_sparse,
    check_fixed_window,
    read_fraction,
    register_bounded,
    sink_window_capacity,
    sink_window_keep,
    sink_window_visible,
)
from ._sparse import SparseConfig, SparseState, decode_width, row_lists


@dataclass(kw_only=True)
class StreamingConfig(SparseConfig):
    sink_tokens: int = option(4, "initial tokens always attended (attention sinks; paper: 4)", min=0)
    window: int = option(1024, "recent tokens attended by each query", min=1)

    DENSE_EQUIVALENT: ClassVar[dict] = {"window": 1 << 30}
    DENSITY_FIELDS: ClassVar[tuple] = ("window",)

    def fields_for_density(self, density: float, geometry: BlockGeometry) -> dict:
        """The window (whole blocks of tokens) whose sink + window rows read ``density``: row ``i`` of ``n`` reads
        ``min(i + 1, sinks + recent)`` blocks, closed form."""
        n, sinks = geometry.n_k, math.ceil(self.sink_tokens / geometry.block_k)

        def reads(recent):
            return pattern_density(capped_rows(n, sinks + recent), min(n, sinks + recent), n, self.last_block_dense)

        return {"window": window_for_blocks(closest_budget(reads, density, 1, n), geometry.block_k)}

    def max_blocks_per_row(self, n_k: int) -> int:
        # The sink run plus the window's blocks for a query block's rows (window + up to two block edges).
        return math.ceil(self.sink_tokens / self.block_size) + math.ceil(self.window / self.block_size) + 3


def sink_and_window_lists(g: BlockGeometry, sink_tokens: int, window: int, width: int, device=None):
    """One query block (decoding): ``sink_and_window``'s row as ready lists ``([1, 1, 1, width], [1, 1, 1])``.

    The KV length changes every decode step, so the static cache never hits; building the mask and sorting it
    cost ~20 small kernels per step.  The row's runs (``masks.sink_and_window_row``: blocks ``[0, sinks)`` and
    ``[recent, NK)``) are known on the host, so a few element-wise ops give the same lists with no host sync, kept
    per runs (``row_lists``), which change once per block.
    """
    return row_lists(sink_and_window_row(g, sink_tokens, window), width, device)


def _select(geometry, query, key, state):
    config = state.config
    if geometry.n_q == 1:
        return sink_and_window_lists(geometry, config.sink_tokens, config.window, decode_width(config, geometry),
                                     query.device)
    return sink_and_window(geometry, config.sink_tokens, config.window, device=query.device)


def _decode_rows(rows, query, key, state):
    config = state.config
    width = decode_width(config, rows.geometry())
    plan = ("streaming", config.block_size, config.sink_tokens, config.window, width)
    return rows.once(plan, lambda: rows_lists(sink_and_window_device_rows(rows, config.sink_tokens, config.window),
                                              width, query.device))


@dataclass
class StreamingState(SparseState):
    """``SparseState`` plus the slots a bounded KV cache hands the current call (``methods._kept``)."""

    kept_keys: KeptKeys | None = None


# ---- bounded KV memory (patchattn.bounded_cache) ----------------------------------------------------------------
def _bounded_plan(state, kv_heads: int, query_heads: int):
    check_fixed_window(state.config)
    if state.layer_index in state.config.dense_layers:
        return None
    config = state.config
    return SlotPlan(groups=(tuple(range(kv_heads)),),
                    capacity=(sink_window_capacity(config.block_size, config.sink_tokens, config.window),))


def bounded_call(state, query, kept: KeptKeys, *, scaling, softcap):
    """Attention over a bounded cache's slots, then what to keep; ``[B, Tq, Hq, Dv]``."""
    config = state.config
    (group,) = kept.groups
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if query.shape[2] > 1 and config.last_block_dense:
        raise NotImplementedError("streaming: last_block_dense reads every key on a multi-token call, which a bounded "
                                  "cache has evicted; pass last_block_dense=False or use the default cache")
    qpos = kept.query_positions
    visible = sink_window_visible(qpos, group.positions, config.block_size, config.sink_tokens, config.window)
    out = attend_slots(query, group.keys, group.values, visible, scaling=scaling, softcap=softcap)
    state.record(density=read_fraction(visible, qpos))
    kept.retain((sink_window_keep(qpos, group.positions, config.block_size, config.sink_tokens, config.window),))
    return out


@register_method("streaming", config=StreamingConfig, category="sparse", families=("llm", "lvlm"),
                 patterns=("causal-self",), select=_select, static=True, state_cls=StreamingState, key_bounds=True,
                 paper="Xiao et al., Efficient Streaming Language Models with Attention Sinks (ICLR 2024), arXiv "
                 "2309.17453")
def streaming_attention(module, query, key, value, attention_mask, *, scaling=None, **kwargs):
    """Attention sinks plus a sliding window of recent tokens."""
    return bounded_or_sparse(module, query, key, value, attention_mask, scaling=scaling, select=_select,
                             decode_rows=_decode_rows, keeps=_keeps, bounded=bounded_call, **kwargs)


def _keeps(state, kept: KeptKeys, query_heads: int) -> tuple:
    (group,) = kept.groups
    config = state.config
    return (sink_window_keep(kept.query_positions, group.positions, config.block_size, config.sink_tokens,
                             config.window),)


register_bounded("streaming", _bounded_plan)
