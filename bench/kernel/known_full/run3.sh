#!/usr/bin/env bash
# Call 3 behind bench/kernel/known_full/ (repository root as cwd; results in $OUT): hip-attn beside our hip with
# single synchronised calls recorded before do_bench (call 2's 32k figure looked like per-call compiles), and fwd+bwd
# at 16k timed eagerly, in a tight loop and from CUDA graphs, ours and Flex (eager_vs_graph.py).
set -uo pipefail
export PYTHONUNBUFFERED=1 PATCHATTN_CHECKS=0 PYTHONPATH=.
out=${OUT:-bench/kernel/known_full}
timeout 240 python3 bench/methods/hip_attn_peer.py .whl/hip_attn-1.2.9-py3-none-any.whl --T 32768,131072 \
    --json "$out/hip_attn_peer3.json" 2>&1 | grep -v "UserWarning\|warnings.warn" > "$out/hip_attn_peer3.log"
tail -3 "$out/hip_attn_peer3.log" | cut -c1-900
timeout 300 python3 bench/kernel/known_full/eager_vs_graph.py "$out/eager_vs_graph.json" > "$out/eager_vs_graph.log" 2>&1
tail -12 "$out/eager_vs_graph.log" | cut -c1-400
