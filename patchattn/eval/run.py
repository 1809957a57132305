"""``patchattn eval``: many methods x offline tasks on one model, in one command, resumable.

    patchattn eval --model smollm2 --methods dense,hip,streaming --tasks passkey,ppl --json out.json

The model is loaded once; each (method, task) cell runs the task through lm-eval's harness with the ``patchattn``
model (so the numbers are what ``python -m patchattn.lm_eval`` gives) and is written to ``--json`` (and
``--csv``) as soon as it finishes, with the task parameters, package versions and hardware.  Run the same command
again and finished cells are skipped (cells whose parameters changed are run again).  For each method the file
also gets the key blocks it reads for one layer and head on real text (``--blocks-*``), for ``patchattn report``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time

from tqdm.auto import tqdm

from .. import api
from ..data import text_token_ids
from ..lm_eval import require_lm_eval
from ..registry import get_spec
from ..report import environment, format_table
from ..tasks import task_name
from .blocks import read_blocks
from .harness import evaluate, make_lm
from .notes import dense_note, reads_everything

DEFAULT_METHODS = "dense,blocktopk,hip,streaming"
DEFAULT_TASKS = "passkey,ppl"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="patchattn eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 (default), gemma3-270m, or a local model path")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma-separated; variants as 'name@tag:{json overrides}' separated by ';'")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help="passkey, needle, vartrack, ppl (comma-separated)")
    p.add_argument("--lengths", default="1024,2048,4096", type=number_list(int, "positive integers", 1),
                   help="task lengths in tokens (capped at the context)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", type=number_list(float, "numbers in [0, 1]", 0, 1),
                   help="needle depths for passkey / needle")
    p.add_argument("--samples", type=int, help="examples per cell of the task's grid (default: the task's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="at most this many examples per task (lm-eval --limit)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", required=True, help="results file (read back to resume)")
    p.add_argument("--csv", help="also write one row per cell here")
    p.add_argument("--fresh", action="store_true", help="ignore finished cells in --json and run everything")
    p.add_argument("--blocks-length", type=int, default=2048, help="tokens of real text for the block images")
    p.add_argument("--blocks-layer", type=int, help="layer for the block images (default: the middle one)")
    p.add_argument("--blocks-head", type=int, default=0)
    p.add_argument("--no-blocks", action="store_true", help="skip the block images")
    return p.parse_args(argv)


def number_list(kind, what: str, low: float, high: float | None = None):
    """argparse type: comma-separated numbers of ``kind`` in [low, high]; the error names the bad item."""

    def parse(text: str) -> list:
        values = []
        for item in filter(None, (part.strip() for part in text.split(","))):
            try:
                value = kind(item)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {item!r} in {text!r}") from None
            if value < low or (high is not None and value > high):
                raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {item!r} in {text!r}")
            values.append(value)
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}")
        return values

    return parse


def task_params(args) -> dict:
    params = {"lengths": list(args.lengths), "depths": list(args.depths), "seed": args.seed, "limit": args.limit}
    if args.samples is not None:
        params["samples"] = args.samples
    return params


def parse_methods(text: str) -> list[tuple[str, str, dict]]:
    """``--methods``: names, or variants ``name@tag:{JSON overrides}`` separated by ';'; each checked now."""
    try:
        methods = api.parse_methods(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"the overrides after 'name@tag:' must be a JSON object such as "
                         f"hip@k8:{{\"top_k\": 8}} (keys in double quotes), got {text!r} ({err.msg})") from None
    for label, name, overrides in methods:
        if not isinstance(overrides, dict):
            raise ValueError(  # noqa: TRY004  (a malformed argument, reported like the others)
                f"the overrides of {label!r} must be a JSON object, got {overrides!r}")
        api.get_config(name, **overrides)  # unknown method or field: fail now, naming the known ones
    return methods


# --------------------------------------------------------------------------------------------------------------
# Results file
# --------------------------------------------------------------------------------------------------------------
def load_results(path: str, fresh: bool) -> dict:
    if fresh or not os.path.exists(path):
        return {"cells": [], "blocks": {}}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def write_results(path: str, results: dict, csv_path: str | None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1)
    os.replace(tmp, path)  # a run cut short never leaves a half-written file
    if csv_path:
        write_csv(csv_path, results)


def write_csv(path: str, results: dict) -> None:
    rows = [{"method": c["method"], "task": c["task"], "density": c.get("density"), "seconds": c.get("seconds"),
             **c["metrics"]} for c in results["cells"]]
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)


def find_cell(results: dict, method: str, task: str, params: dict) -> dict | None:
    for cell in results["cells"]:
        if cell["method"] == method and cell["task"] == task and cell["params"] == params:
            return cell
    return None


# --------------------------------------------------------------------------------------------------------------
# One cell
# --------------------------------------------------------------------------------------------------------------
def run_cell(lm, model_name: str, label: str, task: str, params: dict) -> dict:
    full = task_name(task)
    cfg = {k: v for k, v in params.items() if k != "limit"}
    start = time.perf_counter()
    out = evaluate(model_name, [full], lm=lm, limit=params.get("limit"), log_samples=True, **cfg)
    seconds = time.perf_counter() - start
    metrics = {k.split(",")[0]: v for k, v in out["results"][full].items()
               if "," in k and "stderr" not in k and isinstance(v, (int, float))}
    samples = [compact_sample(s, lm.tokenizer) for s in out["samples"][full]]
    if task == "ppl":
        metrics["token_perplexity"] = token_perplexity(samples)
    return {"method": label, "task": task, "params": params, "metrics": metrics, "density": lm.density,
            "seconds": seconds, "samples": samples}


def compact_sample(sample: dict, tokenizer) -> dict:
    doc = sample["doc"]
    row = {"length": doc["length"], "depth": doc.get("depth"), "sample": doc.get("sample")}
    response = sample["filtered_resps"][0]
    if isinstance(response, str):
        row.update(answer=doc.get("answer"), output=response[:80], score=sample.get("acc"))
    else:  # rolling log-likelihood: the document's total log-probability and its token count
        row.update(loglikelihood=float(response),
                   tokens=len(tokenizer(doc["text"], add_special_tokens=False).input_ids))
    return row


def token_perplexity(samples: list[dict]) -> float:
    """exp of the mean negative log-likelihood per token over all documents."""
    nll = -sum(s["loglikelihood"] for s in samples)
    return math.exp(nll / sum(s["tokens"] for s in samples))


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        require_lm_eval()
    except ImportError as err:
        print(f"patchattn eval: {err}", file=sys.stderr)
        return 2
    try:
        methods = parse_methods(args.methods)
    except ValueError as err:  # as argparse words its own errors: the argument, then what is wrong with it
        raise ValueError(f"argument --methods: {err}") from None
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for task in tasks:
        task_name(task)  # unknown task: fail before loading anything
    params = task_params(args)
    results = load_results(args.json, args.fresh)
    todo = [(m, t) for m in methods for t in tasks if find_cell(results, m[0], t, params) is None]
    print(f"patchattn eval: {len(methods) * len(tasks) - len(todo)} cells done, {len(todo)} to run", flush=True)
    lm = None
    if todo or not args.no_blocks:
        lm = _load(args)
    results.update(model=args.model, command=["patchattn", "eval", *(argv or sys.argv[1:])], params=params,
                   environment=_environment(lm), methods={label: {"method": name, "overrides": overrides}
                                                          for label, name, overrides in methods})
    for (label, name, overrides), task in tqdm(todo, desc="methods x tasks", unit="cell"):
        _repatch(lm, name, overrides)
        cell = run_cell(lm, args.model, label, task, params)
        results["cells"] = [c for c in results["cells"] if not (c["method"] == label and c["task"] == task)]
        results["cells"].append(cell)
        write_results(args.json, results, args.csv)
        tqdm.write(f"{label:>14} {task:>9}: " + ", ".join(f"{k}={v:.4g}" for k, v in cell["metrics"].items()
                                                          if not k.startswith("acc_")))
    if not args.no_blocks:
        _block_maps(lm, args, methods, results)
    write_results(args.json, results, args.csv)
    print(summary(results, methods, tasks, params))
    print(f"\nwrote {args.json}" + (f" and {args.csv}" if args.csv else "")
          + f" (tables and plots: patchattn report {args.json})")
    return 0


def summary(results: dict, methods, tasks: list[str], params: dict) -> str:
    """The cells of this command as a table, then a note for each sparse method that ran dense at these lengths."""
    rows = []
    for label, _name, _overrides in methods:
        for task in tasks:
            cell = find_cell(results, label, task, params)
            if cell is not None:
                metrics = {k: v for k, v in cell["metrics"].items() if not k.startswith("acc_")}
                rows.append({"method": label, "task": task, **metrics, "density": cell.get("density"),
                             "seconds": cell.get("seconds")})
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["", f"{results.get('model')}: {len(rows)} cells, lengths {params['lengths']}", format_table(rows, columns)]
    for label, note in dense_notes(results, methods, max(params["lengths"])):
        lines.append(f"note: {label}: {note}")
    return "\n".join(lines)


def dense_notes(results: dict, methods, tokens: int) -> list[tuple[str, str]]:
    """(label, note) for each sparse method whose cells all read every block: it ran dense, and the note says why."""
    notes = []
    for label, name, overrides in methods:
        densities = [c.get("density") for c in results["cells"] if c["method"] == label]
        if densities and all(reads_everything(get_spec(name).category, d) for d in densities):
            notes.append((label, dense_note(api.get_config(name, **overrides), tokens, "--lengths")))
    return notes


def _load(args):
    return make_lm(args.model, "dense", device=args.device, dtype=args.dtype)


def _repatch(lm, name: str, overrides: dict) -> None:
    handle = api.patch(lm.model, name, **overrides)
    lm.handle, lm.method_name, lm.method_config = handle, handle.method, handle.config.to_dict()


def _block_maps(lm, args, methods, results) -> None:
    model = lm.model
    layer = args.blocks_layer if args.blocks_layer is not None else model.config.num_hidden_layers // 2
    ids = text_token_ids(lm.tokenizer, args.blocks_length)
    key = {"length": args.blocks_length, "layer": layer, "head": args.blocks_head}
    api.unpatch(model)
    for label, name, overrides in tqdm(methods, desc="block maps", unit="method"):
        done = results["blocks"].get(label)
        if done and all(done.get(k) == v for k, v in key.items()):
            continue
        block_map = read_blocks(model, ids, name, overrides, layer=layer, head=args.blocks_head)
        results["blocks"][label] = block_map.to_json()
        write_results(args.json, results, args.csv)


def _environment(lm) -> dict:
    import lm_eval  # optional: the lm-eval extra (main checked it is installed)

    info = environment()
    info["lm_eval"] = lm_eval.__version__
    if lm is not None:
        info["model_device"] = str(lm.model.device)
        info["model_dtype"] = str(lm.model.dtype)
    info["cpu_count"] = os.cpu_count()
    return info


if __name__ == "__main__":
    raise SystemExit(main())
