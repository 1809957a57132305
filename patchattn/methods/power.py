"""``power`` — PowerAttention: sink block, local blocks, and blocks at power-of-two distances.

Each query block reads the sink block(s), its ``local_blocks`` nearest blocks and the blocks ``2^i`` blocks back,
so any token is reachable from any later one within ``ceil(log2 n)`` layers with O(log n) blocks per query block.
The paper (arXiv 2503.03588) uses 256-token blocks after continued pre-training; training-free use is weaker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import option
from ..masks import power_of_two
from ..registry import register_method
from ._sparse import SparseConfig, sparse_forward


@dataclass(kw_only=True)
class PowerConfig(SparseConfig):
    sink_blocks: int = option(1, "initial blocks always attended", min=0)
    local_blocks: int = option(5, "nearest blocks attended (paper: ~5)", min=1)

    DENSE_EQUIVALENT: ClassVar[dict] = {"local_blocks": 1 << 30}


def _select(geometry, query, key, state):
    config = state.config
    return power_of_two(geometry, config.sink_blocks, config.local_blocks, device=query.device)


power_attention = register_method(
    "power",
    config=PowerConfig,
    category="sparse",
    families=("llm", "lvlm"),
    patterns=("causal-self",),
    paper="Chen et al., PowerAttention: Exponentially Scaling of Receptive Fields for Effective Sparse Attention, "
    "arXiv 2503.03588",
)(
    sparse_forward("power", _select, static=True, doc="Sink, local and power-of-two-distance blocks.")
)
