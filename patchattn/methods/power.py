"""``power`` — PowerAttention: sink block, local blocks, and blocks at power-of-two distances.

Each query block reads the sink block(s), its ``local_blocks`` nearest blocks and the blocks ``2^i`` blocks back,
so any token is reachable from any later one within ``ceil(log2 n)`` layers with O(log n) blocks per query block.
The paper (arXiv 2503.03588) uses 256-token blocks after continued pre-training; training-free use is weaker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import option
from ..masks import BlockGeometry, power_of_two
from ..registry import register_method
from ._budget import causal_pairs, closest_budget, pattern_density
from ._sparse import SparseConfig, decode_width, memo_decode_lists, sparse_forward


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
    kernels; the row is known on the host instead: sink run ``[0, sinks)``, the blocks ``last - 2^e`` that fall
    between the runs (``e`` from ``e_hi`` down to ``e_lo``, so ascending), then the local run ``[local, NK)``.
    Same lists as the mask path (ascending, 0 past the count), a few element-wise ops, no host sync, kept per
    block count (``memo_decode_lists``).
    """
    n_k = g.n_k
    last = n_k - 1  # one query block's diagonal block is the last key block
    sinks = min(sink_blocks, n_k)
    local = max(sinks, n_k - local_blocks)  # runs that meet are one run [0, NK)
    # Powers in the gap: sinks <= last - 2^e < local, i.e. last - local < 2^e <= last - sinks.
    e_lo, e_hi = (last - local).bit_length(), (last - sinks).bit_length() - 1
    powers = max(0, e_hi - e_lo + 1) if local > sinks else 0
    count = sinks + powers + n_k - local

    def build():
        i = torch.arange(width, device=device, dtype=torch.int32)
        exponent = (e_hi + sinks - i).clamp(0, max(e_hi, 0))  # clamped where unused: no negative or overflowing shift
        idx = torch.where(i < sinks + powers, last - (1 << exponent), i + (local - sinks - powers))
        idx = torch.where(i < sinks, i, idx)
        idx = torch.where(i < count, idx, 0)
        return idx.view(1, 1, 1, width), torch.full((1, 1, 1), count, device=device, dtype=torch.int32)

    return memo_decode_lists(("power", n_k, sinks, local, width), device, build)


def _select(geometry, query, key, state):
    config = state.config
    if geometry.n_q == 1:
        return power_of_two_lists(geometry, config.sink_blocks, config.local_blocks, decode_width(config, geometry),
                                  query.device)
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
