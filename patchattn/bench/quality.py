"""Quality of the training-free sparse methods against dense on a real model, on the same tokens.

For each method's default config: perplexity ratio (patched / dense) on ``--ppl-lengths`` tokens of CPython's
pydoc text, passkey retrieval accuracy at ``--passkey-lengths`` over ``--depths``, and the density each used.

    python -m patchattn.bench.quality --model smollm2 --json bench/quality/smollm2.json

Runs on CPU (SmolLM2 8k forward: ~30-70 s) or on a GPU (``--device cuda``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from tqdm.auto import tqdm

from .. import api
from ..api import mean_stat, parse_methods
from ..data import TEXTS, passkey_example, text_token_ids
from ..eval.longctx import answer_passkey
from ..eval.ppl import perplexity
from ..report import environment, format_table
from .methods import ints

DEFAULT_METHODS = "dense,streaming,power,s2,blocktopk,hip"


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m patchattn.bench.quality", description=__doc__)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="',' or ';'-separated; 'name@tag:{json overrides}' for variants")
    p.add_argument("--ppl-lengths", default="4096,8192")
    p.add_argument("--texts", default="pydoc", help=f"texts scored for perplexity, ','-separated, of {TEXTS} "
                   "(pydoc columns keep their plain names, others are named 'text:length')")
    p.add_argument("--passkey-lengths", default="2048,4096,8192")
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--json", help="write results here")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows already in --json and run only the labels it does not have yet")
    return p.parse_args(argv)


def evaluate_method(model, tokenizer, label, name, overrides, ppl_inputs, passkeys) -> dict:
    row = {"method": label, "overrides": overrides}
    with api.patched(model, name, **overrides):
        for length, ids in ppl_inputs.items():
            start = time.perf_counter()
            row[f"ppl@{length}"] = perplexity(model, ids)
            row[f"density@{length}"] = mean_stat(model, "density") or 1.0
            row[f"seconds@{length}"] = time.perf_counter() - start
        hits: dict[int, list] = {}
        for example in passkeys:
            correct, text = answer_passkey(model, tokenizer, example)
            hits.setdefault(example.length, []).append({"depth": example.depth, "correct": correct, "text": text})
    row["passkey"] = {str(length): cases for length, cases in hits.items()}
    for length, cases in hits.items():
        row[f"passkey@{length}"] = sum(c["correct"] for c in cases) / len(cases)
    return row


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    dtype = getattr(torch, args.dtype)
    model, tokenizer = api.load(args.model, dtype=dtype)
    model.to(args.device)
    ppl_inputs = {_column(text, n): text_token_ids(tokenizer, n, source=text)
                  for text in _texts(args.texts) for n in ints(args.ppl_lengths)}
    depths = [float(d) for d in args.depths.split(",")]
    passkeys = [passkey_example(tokenizer, n, d) for n in ints(args.passkey_lengths) for d in depths]
    rows = _previous_rows(args)
    done = {r["method"] for r in rows}
    todo = [m for m in parse_methods(args.methods) if m[0] not in done]
    for label, name, overrides in tqdm(todo, desc="methods"):
        rows.append(evaluate_method(model, tokenizer, label, name, overrides, ppl_inputs, passkeys))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "passkey"}), flush=True)
        _write(args, rows)  # after every method, so a long sweep that is cut short keeps what it measured
    dense = next((r for r in rows if r["method"] == "dense"), None)
    if dense is None:
        print("no 'dense' row: ratios need dense on the same tokens (add it to --methods)", file=sys.stderr)
        return 2
    for row in rows:
        for n in ppl_inputs:
            row[f"ratio@{n}"] = row[f"ppl@{n}"] / dense[f"ppl@{n}"]
    columns = ["method"] + [f"{k}@{n}" for n in ppl_inputs for k in ("ratio", "density")]
    columns += [f"passkey@{n}" for n in sorted({e.length for e in passkeys})]
    print(format_table(rows, columns))
    _write(args, rows)
    return 0


def _texts(value: str) -> list[str]:
    texts = [t for t in value.split(",") if t]
    unknown = [t for t in texts if t not in TEXTS]
    if unknown or not texts:
        raise SystemExit(f"--texts: unknown {unknown or value!r}; known: {', '.join(TEXTS)}")
    return texts


def _column(text: str, length: int) -> str:
    """Result-column suffix of a (text, length): the plain length for pydoc (earlier files), else 'text:length'."""
    return str(length) if text == "pydoc" else f"{text}:{length}"


def _previous_rows(args) -> list[dict]:
    if not (args.resume and args.json and os.path.exists(args.json)):
        return []
    with open(args.json, encoding="utf-8") as handle:
        return json.load(handle)["results"]


def _write(args, rows) -> None:
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"model": args.model, "args": vars(args), "environment": environment(), "results": rows},
                      handle, indent=2)


if __name__ == "__main__":
    raise SystemExit(main())
