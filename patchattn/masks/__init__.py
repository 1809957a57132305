"""Block-pattern factories: which key blocks each query block reads (bool ``[H', NQ, NK]``), one small function
per pattern, composable with ``&`` / ``|``.  Dynamic (content-based) selections live beside their methods."""

from .geometry import BlockGeometry
from .static import causal_allowed, power_of_two, sink_and_window, strided_shards

__all__ = ["BlockGeometry", "causal_allowed", "power_of_two", "sink_and_window", "strided_shards"]
