# Run from the repository root on a CUDA GPU: PATCHATTN_AUTOTUNE=0 PYTHONPATH=. python3 bench/kernel/backward_ab/bwd_ab.py
"""Backward alone, split mode, side by side: the previous layout (dQ pass after dK/dV, transposed lists rebuilt every
call) against the transposed-list cache, next to FlexAttention's backward on the
same block mask (its BlockMask carries the transposed indices, built before timing). bf16, 32 q / 8 kv heads, block
128, the first fitting config (no autotuning) so only the layout differs. Writes bwd_ab.json to $OUT (or here)."""
import json
import os

import torch

from patchattn.bench.kernel import backward_points, flex_backward, rel_err, time_ms
from patchattn.kernels import blocksparse as bs
from patchattn.kernels.blocksparse import triton_bwd

# run2/bwd_ab.json also has a "cache_2streams" row per point: the dQ pass on a second CUDA stream beside the dK/dV
# pass (a BWD_STREAMS flag, removed after this run: within +-3% of one stream everywhere, no gain to keep it for).
VARIANTS = {"rebuild_1stream": dict(CACHE_TRANSPOSED=False),
            "cache_1stream": dict(CACHE_TRANSPOSED=True)}
torch._dynamo.config.cache_size_limit = 64
flex = torch.compile(torch.nn.attention.flex_attention.flex_attention, dynamic=False)
rows = []
for p in backward_points(bs, densities=(1.0, 0.5, 0.1, 0.02)):
    point = dict(D=p.D, T=p.T, density=p.density)
    grads = {}
    for name, flags in VARIANTS.items():
        saved = {f: getattr(triton_bwd, f) for f in flags}
        for f, val in flags.items():
            setattr(triton_bwd, f, val)
        try:
            t = time_ms(p.split_backward)
            grads[name] = p.split_backward()
        finally:
            for f, val in saved.items():
                setattr(triton_bwd, f, val)
        err = max(rel_err(a, b) for a, b in zip(grads[name], grads["rebuild_1stream"]))
        rows.append(dict(point, impl=name, bwd_ms=t, fwd_ms=p.fwd_ms, bwd_fwd=t / p.fwd_ms, max_rel_diff=err))
        print(json.dumps(rows[-1]), flush=True)
    if p.T <= 16384:
        t_fwd, t, flex_grads = flex_backward(flex, p)
        err = max(rel_err(a, b) for a, b in zip(grads["cache_1stream"], flex_grads))
        rows.append(dict(point, impl="flex", bwd_ms=t, fwd_ms=t_fwd, bwd_fwd=t / t_fwd, max_rel_diff=err))
        print(json.dumps(rows[-1]), flush=True)
        del flex_grads
    del grads
json.dump(rows, open(os.path.join(os.environ.get("OUT", "bench/kernel/backward_ab"), "bwd_ab.json"), "w"), indent=1)
