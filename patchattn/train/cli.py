"""``patchattn train RECIPE [--steps N] [--seq-len N] [--model NAME] [--output DIR] [--resume] [--no-eval]``.

RECIPE is the name of a shipped recipe (``moh``, ``longlora``, ``sinklora``, ``composite``, ``clear``: ``patchattn/recipes/``) or a
folder.  A DiT distillation recipe (``"kind": "dit_distill"`` in train.json, e.g. ``clear``) takes ``--model`` (a local
diffusers folder or ``tiny-<family>``), ``--steps``, ``--output``, ``--set`` (``grid``, ``n_text``, ...).
"""

from __future__ import annotations

import argparse
import json
import sys

from ..arguments import positive_int
from .recipe import RecipeError, bound_evaluations, load_recipe, shipped_recipes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="patchattn train", description="Run a fine-tuning recipe folder: LoRA plus the "
                                "attention patch's own parameters; saves adapter, patch state, metrics, loss curve.")
    p.add_argument("recipe", help=f"a shipped recipe ({', '.join(shipped_recipes())}) or a recipe folder (patch.json, "
                   "lora.json, train.json[, inference.json])")
    p.add_argument("--steps", type=positive_int, help="override train.json steps; fewer steps than the recipe's also "
                   "shrink its evaluations in proportion, so the whole run stays short")
    p.add_argument("--seq-len", type=positive_int, help="override train.json seq_len")
    p.add_argument("--eval-chunks", type=positive_int,
                   help="held-out chunks per evaluation (override train.json eval_chunks)")
    p.add_argument("--no-eval", action="store_true",
                   help="skip the held-out evaluations (before, during and after training): train and save only")
    p.add_argument("--model", help="override train.json model: smollm2, tiny-llama (random, for smoke runs), a path; "
                   "DiT recipes: a local diffusers folder, or tiny-flux, tiny-wan, ... (random, for smoke runs)")
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
    named = {"steps": args.steps, "seq_len": args.seq_len, "model": args.model, "output_dir": args.output,
             "eval_chunks": args.eval_chunks}
    out.update({k: v for k, v in named.items() if v is not None})
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        overrides = overrides_from(args)
        recipe = load_recipe(args.recipe, overrides)
    except (RecipeError, FileNotFoundError) as err:
        print(f"patchattn train: error: {err}", file=sys.stderr)
        return 2
    if not args.no_eval:
        scaled = bound_evaluations(recipe.train, recipe.planned_steps, fixed=tuple(overrides))
        if scaled:
            print(f"patchattn train: {scaled}", flush=True)
    # torch, accelerate and peft load here, after the arguments and the recipe are known to be good
    from .run import RunOptions, output_dir_of, train

    options = RunOptions(resume=args.resume, stop_after=args.stop_after, progress=not args.no_progress,
                         evaluate=not args.no_eval)
    result = train(recipe, options)
    if "process_index" in result:  # another process of a data-parallel run: the main one reports
        return 0
    print(json.dumps(result, indent=1))
    print(f"outputs in {output_dir_of(recipe)}")
    return 0
