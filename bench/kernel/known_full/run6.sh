#!/usr/bin/env bash
# Call 6 behind bench/kernel/known_full/ (repository root as cwd; results in $OUT): the forward alone at 16k,
# eagerly, in a tight loop and graphed, ours and Flex (eager_vs_graph.py fwd).
set -uo pipefail
export PYTHONUNBUFFERED=1 PATCHATTN_CHECKS=0 PYTHONPATH=.
out=${OUT:-bench/kernel/known_full}
timeout 200 python3 bench/kernel/known_full/eager_vs_graph.py "$out/eager_vs_graph_fwd.json" fwd > "$out/eager_vs_graph_fwd.log" 2>&1
tail -8 "$out/eager_vs_graph_fwd.log" | cut -c1-300
