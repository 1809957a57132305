"""``streaming`` — attention sinks + a sliding window (StreamingLLM; the sink + window of SinkLoRA).

Each query reads the first ``sink_tokens`` keys (the attention sinks) and the ``window`` most recent keys.
Block-granular: whole ``block_size`` blocks are read, so the sink covers the first block and the window is
rounded up to whole blocks (never less than asked).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import option
from ..masks import BlockGeometry, sink_and_window
from ..registry import register_method
from ._budget import capped_rows, closest_budget, pattern_density, window_for_blocks
from ._sparse import SparseConfig, decode_width, memo_decode_lists, sparse_forward


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
    cost ~20 small kernels per step.  The row is two runs, blocks ``[0, sinks)`` and ``[recent, NK)``, known on
    the host, so a few element-wise ops give the same lists (ascending, 0 past the count) with no host sync, and
    they are kept per run bounds (``memo_decode_lists``), which change once per block.
    """
    row = _row_bounds(g, sink_tokens, window)
    return memo_decode_lists(("streaming", *row, width), device, lambda: _row_lists(*row, width, device))


def per_head_window_lists(g: BlockGeometry, sink_tokens: int, windows: list[int], width: int, device=None):
    """One query block (decoding), a sink + window row per head (``windows[h]`` tokens; a window as long as the
    cache is a full row): ``([1, H, 1, width], [1, H, 1])``, equal to the mask path's lists, kept per the heads'
    run bounds like :func:`sink_and_window_lists`."""
    rows = tuple(_row_bounds(g, sink_tokens, w) for w in windows)

    def build():
        lists = [_row_lists(*row, width, device) for row in rows]
        return torch.cat([idx for idx, _ in lists], dim=1), torch.cat([count for _, count in lists], dim=1)

    return memo_decode_lists(("windows", rows, width), device, build)


def _row_bounds(g: BlockGeometry, sink_tokens: int, window: int) -> tuple[int, int, int]:
    """(sink blocks, first recent block, count) of one decoding query block's sink + window row."""
    n_k = g.n_k
    sinks = min(math.ceil(sink_tokens / g.block_k), n_k)
    # The block holding the window's lowest key (the aligned block's first row sets it, as in the mask); runs that
    # meet or overlap are one run [0, NK).
    recent = max(sinks, (g.prefill_aligned().offset - window + 1) // g.block_k)
    return sinks, recent, sinks + n_k - recent


def _row_lists(sinks: int, recent: int, count: int, width: int, device):
    i = torch.arange(width, device=device, dtype=torch.int32)
    idx = torch.where(i < sinks, i, i + (recent - sinks))
    idx = torch.where(i < count, idx, 0)
    return idx.view(1, 1, 1, width), torch.full((1, 1, 1), count, device=device, dtype=torch.int32)


def _select(geometry, query, key, state):
    config = state.config
    if geometry.n_q == 1:
        return sink_and_window_lists(geometry, config.sink_tokens, config.window, decode_width(config, geometry),
                                     query.device)
    return sink_and_window(geometry, config.sink_tokens, config.window, device=query.device)


streaming_attention = register_method(
    "streaming",
    config=StreamingConfig,
    category="sparse",
    families=("llm", "lvlm"),
    patterns=("causal-self",),
    paper="Xiao et al., Efficient Streaming Language Models with Attention Sinks (ICLR 2024), arXiv 2309.17453",
)(
    sparse_forward("streaming", _select, static=True, doc="Attention sinks plus a sliding window of recent tokens.")
)
