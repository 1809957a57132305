"""``streaming`` — attention sinks + a sliding window (StreamingLLM; the sink + window of SinkLoRA).

Each query reads the first ``sink_tokens`` keys (the attention sinks) and the ``window`` most recent keys.
Block-granular: whole ``block_size`` blocks are read, so the sink covers the first block and the window is
rounded up to whole blocks (never less than asked).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import option
from ..masks import sink_and_window
from ..registry import register_method
from ._sparse import SparseConfig, sparse_forward


@dataclass(kw_only=True)
class StreamingConfig(SparseConfig):
    sink_tokens: int = option(4, "initial tokens always attended (attention sinks; paper: 4)", min=0)
    window: int = option(1024, "recent tokens attended by each query", min=1)

    DENSE_EQUIVALENT: ClassVar[dict] = {"window": 1 << 30}


def _select(geometry, query, key, state):
    config = state.config
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
