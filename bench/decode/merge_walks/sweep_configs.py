# Run from the repository root on a CUDA GPU: PYTHONPATH=. python3 bench/decode/merge_walks/sweep_configs.py 1
"""Decode kernel sweep: configs x programs-per-SM x list kinds x densities, graphed, 1 and 8 layers."""
import itertools, json, os, sys
import torch, triton
from decode_setup import T, layers
from patchattn.bench.kernel import random_decode_lists
from patchattn.kernels.blocksparse import decode as dec, triton_fwd

B = int(sys.argv[1]) if len(sys.argv) > 1 else 1
q, caches, timed, sdpa_us = layers(B)
rows = []

with torch.no_grad():
    sdpa1 = sdpa_us(1)
    print("sdpa graph 1 layer us", sdpa1, flush=True)
    lists = {"shared5%b128": random_decode_lists(8, B, T, 128, 0.05, "cuda"),
             "perhead27b64": random_decode_lists(32, B, T, 64, 27 / 2048, "cuda")}
    blks = {"shared5%b128": 128, "perhead27b64": 64}
    configs = [(64, 4, 3), (64, 4, 2), (64, 4, 4), (64, 4, 5), (64, 8, 3), (64, 2, 3), (128, 4, 2), (128, 4, 3),
               (128, 8, 3), (128, 8, 4), (32, 4, 4), (32, 4, 6), (32, 2, 4)]
    base = dec._decode_tuned.configs
    for name, (idx, cnt) in lists.items():
        blk = blks[name]
        for (bn, w, s), pps in itertools.product(configs, (1, 2)):
            if bn > blk:
                continue
            dec._decode_tuned.configs = [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)]
            triton_fwd.TUNED.clear()
            triton_fwd.AUTOTUNE = False
            dec.PROGRAMS_PER_SM = pps
            try:
                t1, t8 = timed(idx, cnt, blk, 1), timed(idx, cnt, blk, 8)
            except Exception as e:  # out of resources etc
                print(name, bn, w, s, pps, "failed", type(e).__name__, str(e)[:100], flush=True)
                continue
            rows.append(dict(lists=name, B=B, BLOCK_N=bn, warps=w, stages=s, pps=pps, us_l1=t1, us_l8=t8,
                             x_l1=sdpa1 / t1))
            print(json.dumps(rows[-1]), flush=True)
    # density slope with the autotuned default
    dec._decode_tuned.configs = base
    dec._decode_tuned.cache.clear()
    triton_fwd.AUTOTUNE = True
    triton_fwd.TUNED.clear()
    dec.PROGRAMS_PER_SM = None
    for dens in (0.0005, 0.0125, 0.025, 0.05, 0.1, 0.2):
        idx, cnt = random_decode_lists(8, B, T, 128, dens, "cuda")
        t1, t8 = timed(idx, cnt, 128, 1), timed(idx, cnt, 128, 8)
        rows.append(dict(lists=f"shared{dens}", B=B, blocks=int(cnt[0, 0, 0]), us_l1=t1, us_l8=t8, x_l1=sdpa1 / t1))
        print(json.dumps(rows[-1]), flush=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "bench/decode/merge_walks"), "sweep_configs_pps_density.json"), "w"), indent=1)
