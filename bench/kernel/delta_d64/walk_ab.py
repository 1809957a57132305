# Run from the repository root on a CUDA GPU: PATCHATTN_AUTOTUNE=0 PYTHONPATH=. python3 bench/kernel/delta_d64/walk_ab.py
"""The split backward alone, side by side: the dK/dV pass walking each head's transposed list in one pipelined loop
with the masked (diagonal) entries behind a branch ("one", which spills ~16 registers per iteration at 64x128 tiles),
in two pipelined loops ("two"), or with the masked prefix unpipelined ("peel": run once for run7/, never won, and
removed from triton_bwd afterwards; this script now times "one" and "two"). bf16, 32 q / 8 kv heads, causal,
block 128, random lists, first config (no autotuning), launch order by head_dim. Writes walk_ab.json to $OUT."""
import json
import os

from patchattn.bench.kernel import backward_points, rel_err, time_ms
from patchattn.kernels import blocksparse as bs
from patchattn.kernels.blocksparse import triton_bwd

rows = []
for p in backward_points(bs, densities=(0.5, 0.1, 0.02)):
    grads = {}
    for walk in ("one", "two"):
        triton_bwd.DKDV_WALK = walk
        t = time_ms(p.split_backward)
        grads[walk] = p.split_backward()
        err = max(rel_err(a, b) for a, b in zip(grads[walk], grads["one"]))
        rows.append(dict(D=p.D, T=p.T, density=p.density, walk=walk, bwd_ms=t, fwd_ms=p.fwd_ms,
                         bwd_fwd=t / p.fwd_ms, max_rel_diff=err))
        print(json.dumps(rows[-1]), flush=True)
    triton_bwd.DKDV_WALK = "auto"
    del grads
json.dump(rows, open(os.path.join(os.environ.get("OUT", "bench/kernel/delta_d64"), "walk_ab.json"), "w"), indent=1)
