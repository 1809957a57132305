# Run from the repository root on a CUDA GPU: PYTHONPATH=. python3 bench/decode/merge_walks/sweep_merge_walks.py
"""Decode merge walks x splits x configs, graphed, 1 and 8 layers per graph, B=1 (and B=8)."""
import json, os
import torch, triton
from decode_setup import T, layers
from patchattn.bench.kernel import random_decode_lists
from patchattn.kernels import blocksparse as bs
from patchattn.kernels.blocksparse import decode as dec, triton_fwd

rows = []
orig_choose = dec.choose_splits

def floor_splits(n_programs_base, n_entries, device, heads=1):
    n = orig_choose(n_programs_base, n_entries, device, heads)
    if heads > 1:
        n = max(1, min(n_entries, dec._sm_count(device) // n_programs_base))
    return n

for B in (1, 8):
    q, caches, timed, sdpa_us = layers(B)
    with torch.no_grad():
        sdpa1, sdpa8 = sdpa_us(1), sdpa_us(8)
        print("B", B, "sdpa graph us", sdpa1, sdpa8, flush=True)
        lists = {"shared5%b128": (random_decode_lists(8, B, T, 128, 0.05, "cuda"), 128),
                 "perhead27b64": (random_decode_lists(32, B, T, 64, 27 / 2048, "cuda"), 64)}
        variants = [("rows", 8192, "fused", "ceil"), ("together", 8192, "fused", "ceil"),
                    ("together", 16384, "fused", "ceil"), ("together", 8192, "fused", "floor"),
                    ("rows", 8192, "separate", "ceil"), ("rows", 8192, "fused", "floor")]
        for name, ((idx, cnt), blk) in lists.items():
            ref = bs.block_sparse_attention(q, caches[0][0], caches[0][1], idx, cnt, block_q=16, block_k=blk, backend="torch")
            for cfg in ((64, 4, 3), (64, 2, 3)):
                for walk, budget, merge, split_rule in variants:
                    if B == 8 and (budget != 8192 or cfg != (64, 4, 3)):
                        continue
                    dec._decode_tuned.configs = [triton.Config({"BLOCK_N": cfg[0]}, num_warps=cfg[1], num_stages=cfg[2])]
                    triton_fwd.TUNED.clear(); triton_fwd.AUTOTUNE = False
                    dec.MERGE_BY, dec.TOGETHER_ELEMENTS, dec.MERGE = walk, budget, merge
                    dec.choose_splits = floor_splits if split_rule == "floor" else orig_choose
                    got = bs.block_sparse_attention(q, caches[0][0], caches[0][1], idx, cnt, block_q=16, block_k=blk)
                    err = float((got.float() - ref.float()).abs().max())
                    t1, t8 = timed(idx, cnt, blk, 1), timed(idx, cnt, blk, 8)
                    rows.append(dict(lists=name, B=B, cfg=list(cfg), walk=walk, budget=budget, merge=merge,
                                     splits=split_rule, us_l1=t1, us_l8=t8, x_l1=sdpa1 / t1, x_l8=sdpa8 / t8,
                                     max_err=err))
                    print(json.dumps(rows[-1]), flush=True)
    del caches
dec.MERGE_BY, dec.TOGETHER_ELEMENTS, dec.MERGE, dec.choose_splits = "auto", 8192, "fused", orig_choose
json.dump(rows, open(os.path.join(os.environ.get("OUT", "bench/decode/merge_walks"), "sweep_merge_walks.json"), "w"), indent=1)
