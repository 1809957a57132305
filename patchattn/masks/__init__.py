"""Block-pattern factories: which key blocks each query block reads (bool ``[H', NQ, NK]``), one small function
per pattern, composable with ``&`` / ``|``.  Static patterns are written once, as the runs of one query block's row
(``static.py``), from which both the prefill mask and the decode lists come.  Dynamic (content-based) selections
live beside their methods."""

from .geometry import BlockGeometry, RowGeometry
from .static import (PowerRun, Run, causal_allowed, power_of_two, power_of_two_device_rows, power_of_two_row,
                     rows_lists, runs_lists, runs_mask, sink_and_window, sink_and_window_device_rows,
                     sink_and_window_row, sink_and_window_rows, strided_shard_device_rows, strided_shard_rows,
                     strided_shards)

__all__ = ["BlockGeometry", "PowerRun", "RowGeometry", "Run", "causal_allowed", "power_of_two",
           "power_of_two_device_rows", "power_of_two_row", "rows_lists", "runs_lists", "runs_mask", "sink_and_window",
           "sink_and_window_device_rows", "sink_and_window_row", "sink_and_window_rows", "strided_shard_device_rows",
           "strided_shard_rows", "strided_shards"]
