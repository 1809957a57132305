"""``s2`` — S2-Attention: heterogeneous context sharding among heads.

Every head reads its ``local_blocks`` nearest blocks plus a strided shard of the context (blocks ``j`` with
``(j + h) % vert_stride == 0`` for head ``h``), so the heads of a layer jointly cover every block while each reads
about ``1 / vert_stride`` of the far context.  Defaults from the DKernel README: block 64, 32 local blocks,
vertical stride 8.  The paper trains with this pattern; training-free use is reported here as measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import option
from ..masks import strided_shards
from ..registry import register_method
from ._sparse import SparseConfig, sparse_forward


@dataclass(kw_only=True)
class S2Config(SparseConfig):
    local_blocks: int = option(32, "nearest blocks every head reads (DKernel default 32)", min=1)
    vert_stride: int = option(8, "each head reads one far block in this many (DKernel default 8)", min=1)

    DENSE_EQUIVALENT: ClassVar[dict] = {"vert_stride": 1}


def _select(geometry, query, key, state):
    config = state.config
    return strided_shards(geometry, query.shape[1], config.local_blocks, config.vert_stride, device=query.device)


s2_attention = register_method(
    "s2",
    config=S2Config,
    category="sparse",
    families=("llm", "lvlm"),
    patterns=("causal-self",),
    paper="Lin et al., Efficient LLM Training and Serving with Heterogeneous Context Sharding among Attention "
    "Heads (S2-Attention), arXiv 2407.17678",
)(
    sparse_forward("s2", _select, static=True, doc="Local blocks plus per-head strided shards whose union covers the context.")
)
