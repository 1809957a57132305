"""Multi-process inference helpers at the api level (they build on ``api`` and ``methods``, nothing below uses them).

``context_parallel(model, group=None, balance="zigzag", exchange="allgather")``: a long prompt's prefill split over
the ranks of a process group (docs/distributed.md, "Context-parallel prefill"); ``plan_shards``: the split.
"""

from .context_parallel import EXCHANGES, IMPLEMENTATION, SUPPORTED_METHODS, ContextParallel, context_parallel
from .plan import BALANCES, ShardPlan, plan_shards

__all__ = ["BALANCES", "EXCHANGES", "IMPLEMENTATION", "SUPPORTED_METHODS", "ContextParallel", "ShardPlan",
           "context_parallel", "plan_shards"]
