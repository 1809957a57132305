"""``power`` — PowerAttention: sink block, local blocks, and blocks at power-of-two distances.

Each query block reads the sink block(s), its ``local_blocks`` nearest blocks and the blocks ``2^i`` blocks back,
so any token is reachable from any later one within ``ceil(log2 n)`` layers with O(log n) blocks per query block.
The paper (arXiv 2503.03588) uses 256-token blocks after continued pre-training; training-free use is weaker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import option
from ..masks import BlockGeometry, power_of_two, power_of_two_row
from ._sparse import SparseConfig, decode_width, register_sparse_method, row_lists


@dataclass(kw_only=True)
class PowerConfig(SparseConfig):
    sink_blocks: int = option(1, "initial blocks always attended", min=0)
    local_blocks: int = option(5, "nearest blocks attended (paper: ~5)", min=1)

    DENSE_EQUIVALENT: ClassVar[dict] = {"local_blocks": 1 << 30}

    def max_blocks_per_row(self, n_k: int) -> int:
        # Sink and local runs plus at most one block per power of two below n_k.
        return self.sink_blocks + self.local_blocks + n_k.bit_length()


def power_of_two_lists(g: BlockGeometry, sink_blocks: int, local_blocks: int, width: int, device=None):
    """One query block (decoding): ``power_of_two``'s row as ready lists ``([1, 1, 1, width], [1, 1, 1])``.

    Rebuilding the mask each decode step (the KV length changes, so the static cache never hits) costs ~20 small
    kernels; the row's runs are known on the host instead (``masks.power_of_two_row``: sink run, the power-of-two
    distances between the runs, local run), so a few element-wise ops give the mask path's lists with no host sync,
    kept per runs (``row_lists``), which change once per block.
    """
    return row_lists(power_of_two_row(g, sink_blocks, local_blocks), width, device)


def _select(geometry, query, key, state):
    config = state.config
    if geometry.n_q == 1:
        return power_of_two_lists(geometry, config.sink_blocks, config.local_blocks, decode_width(config, geometry),
                                  query.device)
    return power_of_two(geometry, config.sink_blocks, config.local_blocks, device=query.device)


power_attention = register_sparse_method(
    "power",
    config=PowerConfig,
    paper="Chen et al., PowerAttention: Exponentially Scaling of Receptive Fields for Effective Sparse Attention, "
    "arXiv 2503.03588",
    select=_select,
    static=True,
    doc="Sink, local and power-of-two-distance blocks.",
)
