"""``patchattn train RECIPE [--steps N] [--seq-len N] [--model NAME] [--output DIR] [--resume]``."""

from __future__ import annotations

import argparse
import json
import sys

from .recipe import RecipeError, load_recipe
from .run import RunOptions, output_dir_of, train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="patchattn train", description="Run a fine-tuning recipe folder: LoRA plus the "
                                "attention patch's own parameters; saves adapter, patch state, metrics, loss curve.")
    p.add_argument("recipe", help="recipe folder (patch.json, lora.json, train.json[, inference.json]), e.g. "
                   "recipes/longlora")
    p.add_argument("--steps", type=int, help="override train.json steps")
    p.add_argument("--seq-len", type=int, help="override train.json seq_len")
    p.add_argument("--model", help="override train.json model: smollm2, tiny-llama (random, for smoke runs), a path")
    p.add_argument("--output", help="output folder (default: train.json output_dir, else runs/<recipe>)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output folder")
    p.add_argument("--stop-after", type=int, help="stop after this step as if interrupted (resume later)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                   help="override any train.json field, e.g. --set lr=1e-4 --set eval_every=20")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still written)")
    return p


def overrides_from(args) -> dict:
    out = {}
    for item in args.set:
        field, sep, value = item.partition("=")
        if not sep:
            raise RecipeError(f"--set expects FIELD=JSON, got {item!r}")
        try:
            out[field] = json.loads(value)
        except json.JSONDecodeError:
            out[field] = value  # a bare string such as --set schedule=cosine
    named = {"steps": args.steps, "seq_len": args.seq_len, "model": args.model, "output_dir": args.output}
    out.update({k: v for k, v in named.items() if v is not None})
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, overrides_from(args))
    except (RecipeError, FileNotFoundError) as err:
        print(f"patchattn train: error: {err}", file=sys.stderr)
        return 2
    options = RunOptions(resume=args.resume, stop_after=args.stop_after, progress=not args.no_progress)
    result = train(recipe, options)
    print(json.dumps(result, indent=1))
    print(f"outputs in {output_dir_of(recipe)}")
    return 0
