# Run from the repository root on a CUDA GPU: PATCHATTN_AUTOTUNE=0 PYTHONPATH=. python3 bench/kernel/group_walk/group_ab.py
"""The split backward alone, side by side: the dK/dV pass walking the q heads of a GQA group that share one list as
one walk over (entry, head) pairs ("flat": one or two pipelined loops per program) or one walk per head ("loop": four
or eight at GQA 4, each with its own pipeline fill). bf16, 32 q / 8 kv heads, lists per KV head, causal, block 128,
random lists, first config (no autotuning), the other backward choices by head_dim. Writes group_ab.json to $OUT."""
import json
import os

from patchattn.bench.kernel import backward_points, rel_err, time_ms
from patchattn.kernels import blocksparse as bs
from patchattn.kernels.blocksparse import triton_bwd

rows = []
for p in backward_points(bs, densities=(1.0, 0.5, 0.1, 0.02)):
    grads = {}
    for walk in ("loop", "flat"):
        triton_bwd.GROUP_WALK = walk
        t = time_ms(p.split_backward)
        grads[walk] = p.split_backward()
        err = max(rel_err(a, b) for a, b in zip(grads[walk], grads["loop"]))
        rows.append(dict(D=p.D, T=p.T, density=p.density, group_walk=walk, bwd_ms=t, fwd_ms=p.fwd_ms,
                         bwd_fwd=t / p.fwd_ms, max_rel_diff=err))
        print(json.dumps(rows[-1]), flush=True)
    triton_bwd.GROUP_WALK = "auto"
    del grads
json.dump(rows, open(os.path.join(os.environ.get("OUT", "bench/kernel/group_walk"), "group_ab.json"), "w"), indent=1)
