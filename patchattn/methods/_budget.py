"""One budget knob for every block-sparse method: ``density``, mapped per call to each method's own fields.

``density`` is the target fraction of the causally allowed (query block, key block) pairs a prefill reads: the
quantity every sparse call records as ``state.record(density=...)``.  Each sparse config maps it to its own budget
fields with ``fields_for_density(density, geometry)`` (a window, a top-k, a local run...), from the exact block count
of its pattern, so ``patch(model, "hip", density=0.1)`` and ``patch(model, "streaming", density=0.1)`` read the same
share of the blocks and can be compared at one budget.  ``density=None`` (the default) leaves every method at its
paper defaults.

Window budgets depend on the length, so the fields are resolved per call, for the *full forward over the call's
keys* (``n_k`` key blocks, queries = keys): a prefill gets the fields its own length needs, and a decode step gets
what a full recompute over the same keys would use, so cached and uncached generation read the same blocks.  The
fields change once per key block, not per token; they are cached per config and block count (shared by the layers).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

from ..masks import BlockGeometry

DENSITY_RANGE = "(0, 1]"
DENSITY_HELP = ("target fraction of the causal (query block, key block) pairs read at prefill, mapped per call to "
                "this method's own budget fields; None keeps the paper defaults (docs/density.md)")

# (id(config), n_k, block_q, block_k) -> (config, resolved config); the config is kept so its id is never reused
# while its entry lives.  A few lengths and configs at a time: decoding moves to a new block count now and then.
_RESOLVED: OrderedDict = OrderedDict()
RESOLVED_KEPT = 256


def check_density(value, where: str) -> None:
    """ValueError unless ``value`` is None or a number in (0, 1] (other types are left to the type check);
    ``where`` names the field (``"moa: MoAConfig.density"``)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise ValueError(f"{where} must be in {DENSITY_RANGE} (a fraction of the causal block pairs read), "
                         f"got {value!r}")


def check_density_fields(config, fields: tuple[str, ...], defaults: dict) -> None:
    """With ``density`` set, the fields it sets must stay at their defaults (else one would silently win)."""
    if getattr(config, "density", None) is None:
        return
    changed = [name for name in fields if getattr(config, name) != defaults[name]]
    if changed:
        raise ValueError(f"{type(config).__name__}: density sets {', '.join(fields)} per call; do not also pass "
                         f"{', '.join(changed)} (leave them at their defaults, or drop density)")


# ---- exact block counts of a full causal forward over n blocks ---------------------------------------------------
def causal_pairs(n: int) -> int:
    """Causally allowed (query block, key block) pairs of a full forward over ``n`` blocks: row ``i`` sees ``i + 1``."""
    return n * (n + 1) // 2


def capped_rows(n: int, cap: int) -> int:
    """``sum(min(i + 1, cap) for i < n)``: the blocks read when every row reads a run of ``cap`` blocks (clipped by
    causality), e.g. sink + window runs that overlap once they meet."""
    cap = max(0, min(cap, n))
    return cap * (cap + 1) // 2 + (n - cap) * cap


def pattern_density(total: float, last_row: float, n: int, last_block_dense: bool) -> float:
    """Density of ``total`` blocks read over ``n`` rows; with ``last_block_dense`` the last row (``last_row`` blocks
    otherwise) reads its whole causal past, ``n`` blocks."""
    if last_block_dense:
        total = total - last_row + n
    return total / causal_pairs(n)


def closest_budget(density_of: Callable[[int], float], target: float, lo: int, hi: int, *,
                   increasing: bool = True) -> int:
    """The integer budget in ``[lo, hi]`` whose density is closest to ``target`` (ties: the cheaper one), by bisection
    on a density monotone in the budget (``increasing`` or decreasing, e.g. a stride)."""
    if lo > hi:
        raise ValueError(f"empty budget range [{lo}, {hi}]")

    def reads(b):  # non-decreasing in the search variable
        return density_of(b) if increasing else density_of(hi + lo - b)

    left, right = lo, hi  # first b with reads(b) >= target, or hi
    while left < right:
        mid = (left + right) // 2
        if reads(mid) >= target:
            right = mid
        else:
            left = mid + 1
    best = left
    if left > lo and abs(reads(left - 1) - target) <= abs(reads(left) - target):
        best = left - 1
    return best if increasing else hi + lo - best


def window_for_blocks(recent: int, block: int) -> int:
    """The smallest whole-block token window whose band covers ``recent`` key blocks per block-aligned query block
    (its own block, partly, and ``recent - 1`` before it)."""
    return max(1, (recent - 1) * block)


# ---- per-call resolution -----------------------------------------------------------------------------------------
def full_forward_geometry(geometry: BlockGeometry) -> BlockGeometry:
    """The geometry the budget is solved on: a full forward over the call's key blocks (see the module docstring)."""
    n = geometry.n_k
    return BlockGeometry(n * geometry.block_q, n * geometry.block_k, geometry.block_q, geometry.block_k)


def resolved_config(config, geometry: BlockGeometry):
    """``config`` with its ``density`` turned into its own fields for this call's length (``config`` itself when it
    has no density or its fields already follow it, as moa's band)."""
    if getattr(config, "density", None) is None:
        return config
    key = (id(config), geometry.n_k, geometry.block_q, geometry.block_k)
    hit = _RESOLVED.get(key)
    if hit is not None and hit[0] is config:
        _RESOLVED.move_to_end(key)
        return hit[1]
    fields = config.fields_for_density(config.density, full_forward_geometry(geometry))
    resolved = config.replace(density=None, **fields) if fields else config
    _RESOLVED[key] = (config, resolved)
    while len(_RESOLVED) > RESOLVED_KEPT:
        _RESOLVED.popitem(last=False)
    return resolved


class budget_applied:
    """``with budget_applied(state, geometry):`` -- within the block, ``state.config`` is the config resolved for this
    call (the selectors read it there).  A plain class, not a generator: calls without a density pay one check."""

    __slots__ = ("geometry", "original", "state")

    def __init__(self, state, geometry: BlockGeometry):
        self.state, self.geometry, self.original = state, geometry, None

    def __enter__(self):
        config = self.state.config
        if getattr(config, "density", None) is None:
            return config
        resolved = resolved_config(config, self.geometry)
        if resolved is not config:
            self.original = config
            self.state.config = resolved
        return resolved

    def __exit__(self, *exc) -> None:
        if self.original is not None:
            self.state.config, self.original = self.original, None
