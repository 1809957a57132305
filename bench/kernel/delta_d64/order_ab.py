# Run from the repository root on a CUDA GPU: PATCHATTN_AUTOTUNE=0 PYTHONPATH=. python3 bench/kernel/delta_d64/order_ab.py
"""The split backward alone, side by side: launch order of both passes (all heads of a tile together, the previous
order, or all tiles of a head together) x the dK/dV tile (64 x 128 query x key rows, which spills at 255 registers,
or 32 x 128, which does not; 8 warps, 3 stages both), next to FlexAttention's backward on the same mask. bf16, 32 q /
8 kv heads, causal, block 128, random lists; dQ pass at its first config. Writes order_ab.json to $OUT (or here)."""
import json
import os

import torch
import triton

from patchattn.bench.kernel import backward_points, flex_backward, rel_err, time_ms
from patchattn.kernels import blocksparse as bs
from patchattn.kernels.blocksparse import triton_bwd, triton_fwd

DKDV = {"m64": triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        "m32": triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=8, num_stages=3)}
VARIANTS = [("heads", "m64"), ("tiles", "m64"), ("tiles", "m32"), ("heads", "m32")]
all_configs = list(triton_bwd._dkdv_tuned.configs)
torch._dynamo.config.cache_size_limit = 64
flex = torch.compile(torch.nn.attention.flex_attention.flex_attention, dynamic=False)
rows = []
for p in backward_points(bs, densities=(0.5, 0.1, 0.02)):
    point = dict(D=p.D, T=p.T, density=p.density)
    grads = {}
    for order, tile in VARIANTS:
        triton_bwd.BWD_TILES_FASTEST = order == "tiles"
        triton_bwd._dkdv_tuned.configs = [DKDV[tile]]
        for key in [key for key in triton_fwd.TUNED if key[0] == "_dkdv_kernel"]:
            del triton_fwd.TUNED[key]
        t = time_ms(p.split_backward)
        name = f"{order}_{tile}"
        grads[name] = p.split_backward()
        err = max(rel_err(a, b) for a, b in zip(grads[name], grads["heads_m64"]))
        rows.append(dict(point, impl=name, bwd_ms=t, fwd_ms=p.fwd_ms, bwd_fwd=t / p.fwd_ms, max_rel_diff=err))
        print(json.dumps(rows[-1]), flush=True)
    t_fwd, t, flex_grads = flex_backward(flex, p)
    err = max(rel_err(a, b) for a, b in zip(grads["heads_m64"], flex_grads))
    rows.append(dict(point, impl="flex", bwd_ms=t, fwd_ms=t_fwd, bwd_fwd=t / t_fwd, max_rel_diff=err))
    print(json.dumps(rows[-1]), flush=True)
    del flex_grads, grads
triton_bwd._dkdv_tuned.configs = all_configs
json.dump(rows, open(os.path.join(os.environ.get("OUT", "bench/kernel/delta_d64"), "order_ab.json"), "w"), indent=1)
