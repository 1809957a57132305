# python3 bench/quality/hip_early_rows.py  (CPU, ~8 min; PYTHONPATH=. from the repository root)
"""Where `hip`'s perplexity changed when its search stopped losing blocks in the first query blocks (an empty segment
scattered `False` onto a block another segment had chosen; only query blocks with fewer than `top_k` visible blocks
were affected).  Per-token loss on the 8k pydoc tokens of the quality table, for dense, `hip` now, and `hip` with the
earlier scatter (re-created here), averaged over the affected rows (tokens < 9 x 64) and over the rest."""
import json
import sys

import torch

import patchattn
from patchattn import api
from patchattn.eval.ppl import text_token_ids
from patchattn.kernels.blockselect import reference
from patchattn.methods import hip


def lossy_tree_search(q_rows, k_means, diagonal, k, score_dtype=None):
    """The search as it was: empty segments clamped onto real block indices in the scatter."""
    b, h, n_q = q_rows.shape[:3]
    n_k = k_means.shape[2]
    start, end = reference.initial_segments(diagonal, k)
    start, end = start.expand(b, h, n_q, k).clone(), end.expand(b, h, n_q, k).clone()
    prefix = torch.nn.functional.pad(k_means.cumsum(dim=2, dtype=torch.float32), (0, 0, 1, 0))
    for _ in range(reference.search_rounds(n_k, k)):
        mid = torch.where(end - start > 1, (start + end) // 2, end)
        start, end = torch.cat([start, mid], -1), torch.cat([mid, end], -1)
        best = reference.segment_scores(q_rows, prefix, start, end, score_dtype).topk(k, dim=-1).indices
        start, end = torch.gather(start, -1, best), torch.gather(end, -1, best)
    chosen = torch.zeros(b, h, n_q, n_k, dtype=torch.bool)
    chosen.scatter_(-1, start.clamp(0, n_k - 1), end > start)
    return chosen


def token_losses(model, ids):
    logits = model(input_ids=ids).logits.float()
    return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")


model, tokenizer = api.load("smollm2")
ids = text_token_ids(tokenizer, 8192)
cut = 9 * 64
losses = {}
with torch.no_grad():
    losses["dense"] = token_losses(model, ids)
    with patchattn.patched(model, "hip"):
        losses["hip"] = token_losses(model, ids)
    hip.tree_search_torch = lossy_tree_search
    with patchattn.patched(model, "hip"):
        losses["hip@lossy_scatter"] = token_losses(model, ids)
out = {name: {"mean_nll_early": float(v[:cut].mean()), "mean_nll_rest": float(v[cut:].mean()),
              "ppl": float(v.mean().exp())} for name, v in losses.items()}
print(json.dumps(out, indent=1))
json.dump(out, open(sys.argv[1] if len(sys.argv) > 1 else "bench/quality/hip_early_rows.json", "w"), indent=1)
