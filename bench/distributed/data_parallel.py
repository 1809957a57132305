"""Training throughput of a recipe under DDP / FSDP2 against one process, from the runs' own logs.

    bash bench/distributed/data_parallel.sh [recipe] [steps]      (runs the trainings, then this)
    python bench/distributed/data_parallel.py RUN_DIR [RUN_DIR ...] --csv bench/distributed/data_parallel.csv

Per run folder (``patchattn train --output``): ``metrics.json`` (processes, tokens per optimiser step -- every
process reads its own rows --, the environment stamp) and ``log.jsonl`` (elapsed seconds per step).  Tokens/s is
measured over the steps after ``--skip`` warm-up steps (compilation, allocator, first collectives); ``speedup`` is
against the first folder (the one-process run).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

COLUMNS = ["run", "parallel", "processes", "steps_timed", "tokens_per_step", "seconds", "tokens_per_s", "speedup"]


def throughput(folder: str, skip: int) -> dict:
    with open(os.path.join(folder, "metrics.json"), encoding="utf-8") as f:
        metrics = json.load(f)
    with open(os.path.join(folder, "log.jsonl"), encoding="utf-8") as f:
        steps = [json.loads(line) for line in f]
    steps = [s for s in steps if "lm_loss" in s and "elapsed_s" in s]
    if len(steps) <= skip + 1:
        raise SystemExit(f"{folder}: {len(steps)} logged steps; need more than --skip {skip} + 1")
    first, last = steps[skip], steps[-1]
    timed = last["step"] - first["step"]
    seconds = last["elapsed_s"] - first["elapsed_s"]
    return {"run": os.path.basename(os.path.normpath(folder)), "parallel": metrics["parallel"],
            "processes": metrics["processes"], "steps_timed": timed, "tokens_per_step": metrics["tokens_per_step"],
            "seconds": round(seconds, 3), "tokens_per_s": metrics["tokens_per_step"] * timed / seconds,
            "environment": metrics.get("environment", {})}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders; the first is the baseline (one process)")
    p.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the timing")
    p.add_argument("--csv", default=None)
    args = p.parse_args(argv)
    rows = [throughput(folder, args.skip) for folder in args.runs]
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
        print(f"{row['run']}: {row['parallel']} x{row['processes']}: {row['tokens_per_s']:.0f} tokens/s "
              f"({row['speedup']:.2f}x)")
    if args.csv:
        meta = {"command": "python bench/distributed/data_parallel.py " + " ".join(sys.argv[1:] if argv is None
                                                                                  else argv),
                **rows[0]["environment"]}
        with open(args.csv, "w", newline="", encoding="utf-8") as f:
            f.write("# " + json.dumps(meta) + "\n")
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
