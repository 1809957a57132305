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
from ..masks import BlockGeometry, rows_lists, runs_lists, strided_shard_device_rows, strided_shard_rows, strided_shards
from ._budget import capped_rows, causal_pairs, closest_budget, pattern_density
from ._sparse import SparseConfig, decode_width, memo_decode_lists, register_sparse_method


@dataclass(kw_only=True)
class S2Config(SparseConfig):
    local_blocks: int = option(32, "nearest blocks every head reads (DKernel default 32)", min=1)
    vert_stride: int = option(8, "each head reads one far block in this many (DKernel default 8)", min=1)

    DENSE_EQUIVALENT: ClassVar[dict] = {"vert_stride": 1}
    DENSITY_FIELDS: ClassVar[tuple] = ("local_blocks", "vert_stride")

    def fields_for_density(self, density: float, geometry: BlockGeometry) -> dict:
        """The local run (stride kept) whose pattern reads ``density``; when one local block with the default stride
        already reads more, the stride grows instead (one local block).  Row ``i`` reads ``min(i + 1, local)`` blocks
        plus, averaged over a cycle of ``vert_stride`` heads, ``1 / vert_stride`` of its ``i + 1 - local`` far ones
        (exact when the head count is a multiple of the stride)."""
        n = geometry.n_k

        def reads(local, stride):
            near = capped_rows(n, local)
            last = min(n, local) + (n - min(n, local)) / stride
            return pattern_density(near + (causal_pairs(n) - near) / stride, last, n, self.last_block_dense)

        if reads(1, self.vert_stride) <= density:
            return {"local_blocks": closest_budget(lambda b: reads(b, self.vert_stride), density, 1, n),
                    "vert_stride": self.vert_stride}
        stride = closest_budget(lambda s: reads(1, s), density, self.vert_stride, max(n, self.vert_stride),
                                increasing=False)
        return {"local_blocks": 1, "vert_stride": stride}

    def max_blocks_per_row(self, n_k: int) -> int:
        # The local run plus one block in vert_stride of the rest (rounded up).
        return self.local_blocks + -(-n_k // self.vert_stride) + 1


def strided_shard_lists(g: BlockGeometry, heads: int, local_blocks: int, vert_stride: int, width: int, device=None):
    """One query block (decoding): ``strided_shards``' rows as ready lists ``([1, heads, 1, width], [1, heads, 1])``.

    Rebuilding the mask each decode step (the KV length changes, so the static cache never hits) costs ~20 small
    kernels.  Each head's row is its runs (``masks.strided_shard_rows``: the shard blocks before the local run,
    then the local run), the heads' residues built on the device, so a few element-wise ops on ``[heads, width]``
    give the mask path's lists with no host sync, kept per block count (``memo_decode_lists``).
    """
    n_k = g.n_k
    return memo_decode_lists(("s2", n_k, heads, local_blocks, vert_stride, width), device,
                             lambda: runs_lists(strided_shard_rows(n_k, heads, local_blocks, vert_stride, device),
                                                width, device))


def _select(geometry, query, key, state):
    config = state.config
    if geometry.n_q == 1:
        return strided_shard_lists(geometry, query.shape[1], config.local_blocks, config.vert_stride,
                                   decode_width(config, geometry), query.device)
    return strided_shards(geometry, query.shape[1], config.local_blocks, config.vert_stride, device=query.device)


def _decode_rows(rows, query, key, state):
    config, heads = state.config, query.shape[1]
    width = decode_width(config, rows.geometry())
    plan = ("s2", config.block_size, heads, config.local_blocks, config.vert_stride, width)
    return rows.once(plan, lambda: rows_lists(
        strided_shard_device_rows(rows, heads, config.local_blocks, config.vert_stride), width, query.device))


s2_attention = register_sparse_method(
    "s2",
    config=S2Config,
    paper="Lin et al., Efficient LLM Training and Serving with Heterogeneous Context Sharding among Attention "
    "Heads (S2-Attention), arXiv 2407.17678",
    select=_select,
    decode_rows=_decode_rows,
    static=True,
    doc="Local blocks plus per-head strided shards whose union covers the context.",
)
