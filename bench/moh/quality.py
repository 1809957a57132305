"""MoH quality on SmolLM2-135M (CPU): perplexity ratio to dense on 2048 tokens of CPython's pydoc text.

Training-free conversion with the parameter-free query-norm router (the paper continue-trains after converting;
this is the "before training" point).  Run:  nice python bench/moh/quality.py > bench/moh/quality.json
"""

import json
import sys

import torch

import patchattn
from patchattn.eval.ppl import mean_stat, perplexity, text_token_ids

VARIANTS = [
    ("moh r=0.75 per-token", {"active_ratio": 0.75}),
    ("moh r=0.75 route_block=128", {"active_ratio": 0.75, "route_block": 128}),
    ("moh r=0.5 per-token", {"active_ratio": 0.5, "shared_heads": 2}),
    ("moh r=0.75 learned (untrained init)", {"active_ratio": 0.75, "router": "learned"}),
]


def main(tokens: int = 2048) -> dict:
    model, tokenizer = patchattn.load("smollm2")
    ids = text_token_ids(tokenizer, tokens, offset=4096)  # the demo reads from 0; another stretch here
    with torch.no_grad():
        dense = perplexity(model, ids)
        rows = [{"method": "dense", "ppl": dense, "ratio": 1.0, "density": 1.0}]
        for label, overrides in VARIANTS:
            with patchattn.patched(model, "moh", **overrides):
                ppl = perplexity(model, ids)
                rows.append({"method": label, "overrides": overrides, "ppl": ppl, "ratio": ppl / dense,
                             "density": mean_stat(model, "density"), "tile_skip": mean_stat(model, "tile_skip")})
            print(rows[-1], file=sys.stderr, flush=True)
    return {"model": "SmolLM2-135M-Instruct", "tokens": tokens, "text": "pydoc_data topics from token 4096",
            "rows": rows}


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
