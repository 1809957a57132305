"""Block-pattern factories: which key blocks each query block reads (bool ``[H', NQ, NK]``), one small function
per pattern, composable with ``&`` / ``|``.  Static patterns are written once, as the runs of one query block's row
(``static.py``), from which both the prefill mask and the decode lists come.  Dynamic (content-based) selections
live beside their methods.  Token-exact masks (whole tiles plus a few partial ones) are :class:`TiledMask`
(``tiles.py``), run by :func:`tiled_attention`."""

from .geometry import BlockGeometry, RowGeometry
from .static import (PowerRun, Run, causal_allowed, power_of_two, power_of_two_device_rows, power_of_two_row,
                     rows_lists, runs_lists, runs_mask, sink_and_window, sink_and_window_device_rows,
                     sink_and_window_row, sink_and_window_rows, strided_shard_device_rows, strided_shard_rows,
                     strided_shards)
from .tiles import TiledMask, tiled_attention, tiles_from_parts, tiles_from_predicate, tiles_from_token_mask

__all__ = ["BlockGeometry", "PowerRun", "RowGeometry", "Run", "TiledMask", "causal_allowed", "power_of_two",
           "power_of_two_device_rows", "power_of_two_row", "rows_lists", "runs_lists", "runs_mask", "sink_and_window",
           "sink_and_window_device_rows", "sink_and_window_row", "sink_and_window_rows", "strided_shard_device_rows",
           "strided_shard_rows", "strided_shards", "tiled_attention", "tiles_from_parts", "tiles_from_predicate",
           "tiles_from_token_mask"]
