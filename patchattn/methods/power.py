"""``power`` — PowerAttention: sink block, local blocks, and blocks at power-of-two distances.

Each query block reads the sink block(s), its ``local_blocks`` nearest blocks and the blocks ``2^i`` blocks back,
so any token is reachable from any later one within ``ceil(log2 n)`` layers with O(log n) blocks per query block.
The paper (arXiv 2503.03588) uses 256-token blocks after continued pre-training; training-free use is weaker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import option
from ..masks import BlockGeometry, power_of_two, power_of_two_device_rows, power_of_two_row, rows_lists
from ._budget import causal_pairs, closest_budget, pattern_density
from ._sparse import SparseConfig, decode_width, register_sparse_method, row_lists


@dataclass(kw_only=True)
class PowerConfig(SparseConfig):
    sink_blocks: int = option(1, "initial blocks always attended", min=0)
    local_blocks: int = option(5, "nearest blocks attended (paper: ~5)", min=1)

    DENSE_EQUIVALENT: ClassVar[dict] = {"local_blocks": 1 << 30}
    DENSITY_FIELDS: ClassVar[tuple] = ("local_blocks",)

    def fields_for_density(self, density: float, geometry: BlockGeometry) -> dict:
        """The local run whose pattern reads ``density``, by bisection on the exact count: row ``i`` reads its whole
        past while the sink and local runs meet (``i < sinks + local``), else both runs plus one block per power of
        two ``2^e`` with ``local <= 2^e <= i - sinks`` (the powers that fall between the runs)."""
        n, sinks = geometry.n_k, self.sink_blocks

        def powers_between(local, top):  # sum over m in [local, top] of #{e: local <= 2^e <= m}
            total, floor_bits = 0, (local - 1).bit_length()
            for bits in range(local.bit_length(), top.bit_length() + 1):
                first, last = max(local, 1 << (bits - 1)), min(top, (1 << bits) - 1)
                total += max(0, last - first + 1) * (bits - floor_bits)
            return total

        def reads(local):
            meet = min(n, sinks + local)  # rows that read their whole causal past
            total = causal_pairs(meet) + (n - meet) * (sinks + local) + powers_between(local, n - 1 - sinks)
            last = n if meet == n else sinks + local + max(0, (n - 1 - sinks).bit_length() - (local - 1).bit_length())
            return pattern_density(total, last, n, self.last_block_dense)

        return {"local_blocks": closest_budget(reads, density, 1, n)}

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


def _decode_rows(rows, query, key, state):
    config = state.config
    width = decode_width(config, rows.geometry())
    plan = ("power", config.block_size, config.sink_blocks, config.local_blocks, width)
    return rows.once(plan, lambda: rows_lists(
        power_of_two_device_rows(rows, config.sink_blocks, config.local_blocks), width, query.device))


power_attention = register_sparse_method(
    "power",
    config=PowerConfig,
    paper="Chen et al., PowerAttention: Exponentially Scaling of Receptive Fields for Effective Sparse Attention, "
    "arXiv 2503.03588",
    select=_select,
    decode_rows=_decode_rows,
    static=True,
    doc="Sink, local and power-of-two-distance blocks.",
)
