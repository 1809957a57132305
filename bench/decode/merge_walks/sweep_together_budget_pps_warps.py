# Run from the repository root on a CUDA GPU: PYTHONPATH=. python3 bench/decode/merge_walks/sweep_together_budget_pps_warps.py
"""Together-merge budgets x programs per SM x warps, graphed, B=1 (and B=8 check)."""
import json, os
import torch, triton
from decode_setup import T, layers
from patchattn.bench.kernel import random_decode_lists
from patchattn.kernels import blocksparse as bs
from patchattn.kernels.blocksparse import decode as dec, triton_fwd

rows = []
for B in (1, 8):
    q, caches, timed, sdpa_us = layers(B)
    with torch.no_grad():
        sdpa1, sdpa8 = sdpa_us(1), sdpa_us(8)
        lists = {"shared5%b128": (random_decode_lists(8, B, T, 128, 0.05, "cuda"), 128),
                 "perhead27b64": (random_decode_lists(32, B, T, 64, 27 / 2048, "cuda"), 64)}
        for name, ((idx, cnt), blk) in lists.items():
            ref = bs.block_sparse_attention(q, *caches[0], idx, cnt, block_q=16, block_k=blk, backend="torch")
            for warps in (4, 8):
                for budget in (16384, 32768):
                    for pps in (1, 2, 3):
                        if B == 8 and (pps == 3 or budget == 32768):
                            continue
                        dec._decode_tuned.configs = [triton.Config({"BLOCK_N": 64}, num_warps=warps, num_stages=3)]
                        triton_fwd.TUNED.clear(); triton_fwd.AUTOTUNE = False
                        dec.TOGETHER_ELEMENTS, dec.PROGRAMS_PER_SM = budget, pps
                        got = bs.block_sparse_attention(q, *caches[0], idx, cnt, block_q=16, block_k=blk)
                        err = float((got.float() - ref.float()).abs().max())
                        t1, t8 = timed(idx, cnt, blk, 1), timed(idx, cnt, blk, 8)
                        rows.append(dict(lists=name, B=B, warps=warps, budget=budget, pps=pps, us_l1=t1, us_l8=t8,
                                         x_l1=sdpa1 / t1, x_l8=sdpa8 / t8, max_err=err))
                        print(json.dumps(rows[-1]), flush=True)
    del caches
json.dump(rows, open(os.path.join(os.environ.get("OUT", "bench/decode/merge_walks"), "sweep_together_budget_pps_warps.json"), "w"), indent=1)
