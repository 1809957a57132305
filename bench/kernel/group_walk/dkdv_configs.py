# Run from the repository root on a CUDA GPU: PATCHATTN_AUTOTUNE=0 PYTHONPATH=. python3 bench/kernel/group_walk/dkdv_configs.py
"""The split backward at head_dim 128 with each dK/dV tile config forced (BLOCK_M queries x BLOCK_N keys, warps,
stages), under both group walks: does a tile with fewer accumulator registers per thread (the 64x128 default holds
dK and dV in 128 fp32 registers a thread at 8 warps, and ptxas spills at 255) let the dK/dV pass run faster, or the
flat group walk win at head_dim 128? bf16, 32 q / 8 kv heads, lists per KV head, causal, block 128, random lists.
Rows go to dkdv_configs.json in $OUT as they come."""
import json
import os

import triton

from patchattn.bench.kernel import backward_points, time_ms
from patchattn.kernels import blocksparse as bs
from patchattn.kernels.blocksparse import triton_bwd, triton_fwd

CONFIGS = [(64, 128, 8, 3), (64, 128, 8, 2), (64, 64, 8, 3), (128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3)]
out = os.path.join(os.environ.get("OUT", "bench/kernel/group_walk"), "dkdv_configs.json")
base = triton_bwd._dkdv_tuned.configs
rows = []
for p in backward_points(bs, densities=(0.5, 0.1, 0.02), head_dims=(128,)):
    for m, n, w, s in CONFIGS:
        for walk in ("loop", "flat"):
            triton_bwd._dkdv_tuned.configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)]
            triton_bwd.GROUP_WALK = walk
            triton_fwd.TUNED.clear()
            row = dict(D=p.D, T=p.T, density=p.density, config=f"{m}x{n} w{w} s{s}", group_walk=walk)
            try:
                row["bwd_ms"] = time_ms(p.split_backward)
            except Exception as e:  # out of shared memory / registers
                row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
            json.dump(rows, open(out, "w"), indent=1)
    triton_fwd.TUNED.clear()
triton_bwd._dkdv_tuned.configs = base
triton_bwd.GROUP_WALK = "auto"
