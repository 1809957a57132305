"""Command line: ``patchattn list | demo | bench``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .arguments import positive_int

# Only the standard library at module level: `patchattn --help` and argument errors must not wait for torch.
# Each command imports what it needs when it runs.


def _list(args) -> int:
    from . import api
    from .report import format_table, markdown_table

    table = markdown_table if args.markdown else format_table
    specs = api.list_methods(args.category)
    sections = []  # only what was asked: the method table unless a narrower view was requested
    if not (args.fields or args.patterns or args.families):
        sections.append(table(_method_rows(specs)))
    if args.fields:
        sections.append(_field_lines(specs))
    if args.patterns:
        sections.append(table(_pattern_rows(specs)))
    if args.families:
        sections.append(table(_family_rows()))
    print("\n\n".join(sections))
    return 0


def _method_rows(specs) -> list[dict]:
    return [{"method": s.name, "category": s.category, "families": ",".join(s.families),
             "fine-tune": "yes" if s.needs_finetune else "no", "paper": s.paper} for s in specs]


def _field_lines(specs) -> str:
    lines = []
    for spec in specs:
        lines.append(f"{spec.name} ({spec.config_cls.__name__}):")
        lines += [f"  {name} = {default!r}  - {help_text}" for name, default, help_text
                  in spec.config_cls.describe_fields()]
    return "\n".join(lines)


def _pattern_rows(specs) -> list[dict]:
    """One row per method: which attention patterns (CAB taxonomy) it supports."""
    from .registry import PATTERNS

    return [{"method": s.name, **{p: "yes" if p in s.patterns else "-" for p in PATTERNS}} for s in specs]


def _family_rows() -> list[dict]:
    from .adapters.families import HF_FAMILIES

    return [{"model_type": f.model_type, "kind": f.kind, "notes": f.notes} for f in HF_FAMILIES.values()]


def _demo(args) -> int:
    from .demo import run_demo

    methods = args.methods.split(",") if args.methods else None
    rows = run_demo(args.model, tokens=args.tokens, methods=methods, max_new_tokens=args.max_new_tokens,
                    json_path=args.json, threads=args.threads, density=args.density)
    return 1 if any("error" in r for r in rows) else 0


BENCHMARKS = {
    "kernel": "patchattn.bench.kernel",
    "methods": "patchattn.bench.methods",
    "generate": "patchattn.bench.generate",
    "dit": "patchattn.bench.dit",
    "lvlm": "patchattn.bench.lvlm",
    "linear": "patchattn.bench.linear",
    "quality": "patchattn.bench.quality",
    "report": "patchattn.bench.sparse_report",
}


def _bench(args) -> int:
    # by name: a benchmark's own imports (triton, matplotlib) load only when it runs
    return importlib.import_module(BENCHMARKS[args.what]).main(args.rest)


# Commands whose arguments belong to a module of their own: name -> (module with main(argv), help).
DELEGATED = {
    "eval": ("patchattn.eval.run", "many methods x offline tasks on one model, resumable (JSON/CSV)"),
    "report": ("patchattn.eval.report", "markdown table + plots from `patchattn eval` results"),
    "tasks-path": ("patchattn.tasks", "print the folder of the offline lm-eval tasks (for --include_path)"),
    "train": ("patchattn.train", "run a fine-tuning recipe folder (LoRA + patch state)"),
}


def _delegate(args) -> int:
    # by name: lm-eval and the trainer's dependencies load only for their command
    return importlib.import_module(DELEGATED[args.command][0]).main(args.rest)


def _calibrate(args) -> int:
    from .calibrate import main as calibrate_main

    return calibrate_main([args.what, *args.rest])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="print the registered methods")
    p.add_argument("--category", help="only this category (control, sparse, sink, head, moh, linear, other)")
    p.add_argument("--fields", action="store_true", help="also print each method's config fields and defaults")
    p.add_argument("--families", action="store_true", help="also print the supported model families")
    p.add_argument("--markdown", action="store_true", help="print the method table as markdown (for the README)")
    p.add_argument("--patterns", action="store_true",
                   help="also print which attention patterns (causal/non-causal, self/cross) each method supports")
    p.set_defaults(run=_list)

    p = sub.add_parser("demo", help="run every training-free method on the embedded model against dense")
    p.add_argument("--model", default="smollm2", help="smollm2 (default), gemma3-270m, or a local model path")
    p.add_argument("--tokens", type=positive_int, default=2048, help="perplexity context length (default 2048)")
    p.add_argument("--methods", help="comma-separated subset (default: all training-free methods)")
    p.add_argument("--max-new-tokens", type=positive_int, default=16, help="tokens of the greedy answer (default 16)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads of the perplexity forwards (default: the idle cores; decoding uses one)")
    p.add_argument("--density", type=float, default=None,
                   help="run every sparse method at this common budget (fraction of key blocks, docs/density.md) "
                   "instead of its paper defaults")
    p.set_defaults(run=_demo)

    p = sub.add_parser("bench", help="benchmarks: kernel and methods speed (CUDA GPU), quality (CPU/GPU), report")
    p.add_argument("what", choices=list(BENCHMARKS),
                   help="kernel: block-sparse engine vs SDPA vs FlexAttention; methods: every sparse method at "
                   "Llama-3-8B shapes; generate: model.generate end to end (time to first token, tokens/s, memory); linear: "
                   "Lightning Attention-2 kernel, lightning / landmark / dma layers vs SDPA (prefill, decode); quality: perplexity and passkey vs dense on a real model; report: table + plot")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the benchmark (see --help of each)")
    p.set_defaults(run=_bench)

    p = sub.add_parser("calibrate", help="offline calibrations: moa plans, retrieval-head scores, act and "
                       "headhunter head lists, sink dimensions (var)")
    p.add_argument("what", choices=["moa", "retrieval-heads", "act", "headhunter", "sink-dims"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the calibration (see --help)")
    p.set_defaults(run=_calibrate)

    for name, (_, help_text) in DELEGATED.items():
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the command (see its --help)")
        p.set_defaults(run=_delegate)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        # argparse's REMAINDER drops a leading option (``--help``), so hand delegated commands over directly.
        args = argparse.Namespace(command=argv[0], rest=argv[1:], run=_delegate)
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:  # output piped into a reader that stopped (`patchattn list | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the final flush does not fail too
        return 0
    except (ValueError, TypeError, ImportError, OSError) as err:  # bad input or a missing file: one line, no traceback
        print(f"patchattn {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
