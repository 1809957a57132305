# Run from the repository root on a CUDA GPU: PYTHONPATH=. python3 bench/methods/tree_tune.py
"""hip's prefill selection at 128k (32 q / 8 kv heads, d128, block 64, top_k 10): the tree-search kernel alone under
each (warps, dot precision) variant, whether each variant keeps the same blocks as the default, and the whole
selection split into its steps (key-block means, search, masks, lists), so the next change targets the largest."""
import json

import torch

from patchattn.bench.kernel import time_ms
from patchattn.bench.methods import _select, _state
from patchattn.kernels.blockselect import triton_tree
from patchattn.kernels.blocksparse import blocks_from_mask
from patchattn.methods.blocktopk import block_means

T, Hq, Hkv, D, block, k = 131072, 32, 8, 128, 64, 10
q = torch.randn(1, Hq, T, D, device="cuda", dtype=torch.bfloat16)
key = torch.randn(1, Hkv, T, D, device="cuda", dtype=torch.bfloat16)
means = block_means(key, block).to(torch.bfloat16)


def search():
    return triton_tree.tree_search(q, means, block_q=block, block_k=block, kv_len=T, k=k, per_head=True)


reference = search()
rows = []
# Run 1 (tree_tune_run1.log) varied the dot precision of fp32 operands; queries are bf16 here and the means are
# rounded to bf16 since (2026-11-29), so the variants are launch shapes: warps and pipeline stages.
for stages in (1, 2):
    for warps in (2, 4, 8):
        triton_tree.NUM_STAGES, triton_tree.NUM_WARPS = stages, warps
        try:
            ms = time_ms(search)
            same = float((search() == reference).all(-1).float().mean())
            rows.append(dict(stages=stages, warps=warps, search_ms=ms, rows_equal_to_default=same))
        except Exception as err:  # e.g. out of shared memory
            rows.append(dict(stages=stages, warps=warps, error=f"{type(err).__name__}: {str(err)[:120]}"))
        print(json.dumps(rows[-1]), flush=True)
triton_tree.NUM_STAGES, triton_tree.NUM_WARPS = 1, 4
state = _state("hip", {})
steps = dict(
    key_block_means=time_ms(lambda: block_means(key, block)),
    tree_search=time_ms(search),
    lists_from_a_mask=time_ms(lambda: blocks_from_mask(reference)),
    whole_selection=time_ms(lambda: _select("hip", state, q, key)),
)
print(json.dumps(steps), flush=True)
