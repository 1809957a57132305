"""Passkey retrieval past the tuned length, for tuned runs and the dense base (issue 23: selective / softplus).

    python bench/recipes/passkey_extrapolation.py runs/selective runs/softplus runs/dense_lora \\
        --lengths 2048 4096 8192 --output bench/recipes/passkey_extrapolation.json

Each run folder is loaded as ``patchattn.load(None, adapter=folder)`` does (base model, inference patch with its
learned patch state, LoRA); ``dense`` (always included) is the run's base model unpatched.  A case is a passkey
prompt (``patchattn.data.passkey_example``: the Landmark Attention task, 5-digit key at a depth of repeated filler)
of about ``length`` tokens; a hit is the key as the first number of the greedy continuation (8 new tokens, KV cache).
Writes ``{label: {"passkey@<length>": accuracy, "cases": {length: [[depth, seed, hit], ...]}}}`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import torch

import patchattn
from patchattn.data import passkey_example
from patchattn.report import environment
from patchattn.train.model import load_base

DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


def hits(model, tokenizer, lengths, depths, seeds, device) -> dict:
    out = {"cases": {}}
    for length in lengths:
        cases = []
        for depth in depths:
            for seed in range(seeds):
                example = passkey_example(tokenizer, length, depth, seed=seed)
                ids = example.input_ids.to(device)
                with torch.no_grad():
                    new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                         do_sample=False, pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
                text = tokenizer.decode(new, skip_special_tokens=True)
                found = re.search(r"\d+", text)
                cases.append([depth, seed, bool(found and found.group() == example.answer)])
        out["cases"][str(length)] = cases
        out[f"passkey@{length}"] = sum(c[2] for c in cases) / len(cases)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="output folders of `patchattn train`")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--seeds", type=int, default=2, help="prompts per (length, depth)")
    parser.add_argument("--output", default="bench/recipes/passkey_extrapolation.json")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {"environment": {**environment(), "command": " ".join(sys.argv)}}
    for run in ["dense", *args.runs]:
        if run == "dense":  # the first run's base model, unpatched, no LoRA
            with open(os.path.join(args.runs[0], "recipe.json")) as handle:
                model, tokenizer = load_base(json.load(handle)["train"]["model"])
        else:
            model, tokenizer = patchattn.load(None, adapter=run)
        model = model.to(device).eval()
        results[run] = hits(model, tokenizer, args.lengths, DEPTHS, args.seeds, device)
        print(run, {k: v for k, v in results[run].items() if k.startswith("passkey")}, flush=True)
    with open(args.output, "w") as handle:
        json.dump(results, handle, indent=1)
    print("| run | " + " | ".join(f"passkey {n // 1024}k" for n in args.lengths) + " |")
    print("|---|" + "---|" * len(args.lengths))
    for run, row in results.items():
        if run == "environment":
            continue
        print(f"| `{run}` | " + " | ".join(f"{row[f'passkey@{n}']:.2f}" for n in args.lengths) + " |")


if __name__ == "__main__":
    main()
