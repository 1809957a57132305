"""Block-pattern factories: which key blocks each query block reads (bool ``[H', NQ, NK]``), one small function
per pattern, composable with ``&`` / ``|``.  Static patterns are written once, as the runs of one query block's row
(``static.py``), from which both the prefill mask and the decode lists come.  Dynamic (content-based) selections
live beside their methods."""

from .geometry import BlockGeometry
from .static import (PowerRun, Run, causal_allowed, power_of_two, power_of_two_row, runs_lists, runs_mask,
                     sink_and_window, sink_and_window_row, sink_and_window_rows,
                     strided_shard_rows, strided_shards)

__all__ = ["BlockGeometry", "PowerRun", "Run", "causal_allowed", "power_of_two", "power_of_two_row", "runs_lists",
           "runs_mask", "sink_and_window", "sink_and_window_row", "sink_and_window_rows",
           "strided_shard_rows", "strided_shards"]
