"""Where an eager decode step's time goes (``patchattn bench generate --profile-step PATH``).

Per method, after one prefill with the default (dynamic) cache: the median wall time of a decode step, then one
step under ``cProfile`` -- host time split by who owns it: our code (``patchattn``), ``transformers``, ``torch``'s
Python, and the C/C++ calls (torch operators, kernel launches, synchronisations) each of them makes -- and one step
under ``torch.profiler``: the top host-side operators by self CPU time and, on a GPU, the device kernels' total
and top entries. cProfile slows Python code down, so its split is read as shares, beside the unprofiled step time.
Each step grows the cache by one token, as decoding does.

Writes PATH with the suffix ``.json`` (the figures) and ``.md`` (tables).
"""

from __future__ import annotations

import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

from ..report import environment, markdown_table

HARNESS = "/patchattn/bench/"
OWNERS = (("/patchattn/", "patchattn"), ("/transformers/", "transformers"), ("/torch/", "torch"))


def owner(filename: str) -> str:
    """Who a profiled function belongs to, from its file ('C' for built-in functions, which have none)."""
    if filename == "~":
        return "C"
    path = filename.replace("\\", "/")
    if HARNESS in path:
        return "harness"
    return next((name for marker, name in OWNERS if marker in path), "other")


def step_after_prefill(model, ids: torch.Tensor):
    """A function running one decode step on the cache a prefill of ``ids`` left (each call grows it by one)."""
    from transformers import DynamicCache

    from .generate import cache_argument

    name = cache_argument(model)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{name: cache}).logits
    token = logits[:, -1:].argmax(-1)
    del logits

    def step():
        with torch.no_grad():
            out = model(input_ids=token, use_cache=True, logits_to_keep=1, **{name: cache})
        _sync(ids.device)
        return out

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_ms(step, repeats: int) -> list[float]:
    """Wall milliseconds of ``repeats`` steps (each synchronised)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(1000 * (time.perf_counter() - start))
    return times


def host_split(step) -> dict[str, float]:
    """Milliseconds of one step under cProfile by owner: Python self time per owner, and 'X -> C' for the
    built-in (C/C++) calls made from X's code (torch operators, launches, synchronisations)."""
    profiler = cProfile.Profile()
    profiler.enable()
    step()
    profiler.disable()
    split: dict[str, float] = {}
    for (filename, _, _), (_, _, self_s, _, callers) in pstats.Stats(profiler).stats.items():
        who = owner(filename)
        if who != "C":
            split[who] = split.get(who, 0.0) + 1000 * self_s
            continue
        for (caller_file, _, _), (_, _, caller_self_s, _) in callers.items():
            key = f"{owner(caller_file)} -> C"
            split[key] = split.get(key, 0.0) + 1000 * caller_self_s
    return dict(sorted(split.items(), key=lambda kv: -kv[1]))


def _device_us(event) -> float:
    return float(getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0) or 0)


def operator_profile(step, device: torch.device, top: int) -> dict:
    """One step under torch.profiler: top host operators by self CPU time; device kernels' total and top."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
    events = prof.key_averages()
    host = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    # Kernels are entries of their own (device type CUDA); the operators that launch them also carry their time,
    # so only the kernel entries are summed (the launching operators where a profiler lists no kernel entries).
    timed = [e for e in events if _device_us(e) > 0]
    kernels = [e for e in timed if str(getattr(e, "device_type", "")).endswith("CUDA")] or timed
    kernels.sort(key=lambda e: -_device_us(e))
    return {
        "host_ops": [{"name": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1000} for e in host],
        "host_ops_total_ms": sum(e.self_cpu_time_total for e in events) / 1000,
        "device_kernels_ms": sum(_device_us(e) for e in kernels) / 1000 if device.type == "cuda" else None,
        "device_kernels": [{"name": e.key, "calls": e.count, "device_ms": _device_us(e) / 1000}
                           for e in kernels[:top]],
    }


def profile_method(model, ids: torch.Tensor, steps: int, top: int = 15) -> dict:
    """A method's (the model's current patch) step time, host split and operator profile."""
    step = step_after_prefill(model, ids)
    step_ms(step, 3)  # warm-up: autotuning, the methods' between-step state
    times = step_ms(step, steps)
    split = host_split(step)
    total = sum(split.values()) or 1.0
    return {"step_ms_median": statistics.median(times), "step_ms_min": min(times),
            "host_split_ms": split, "host_split_share": {k: v / total for k, v in split.items()},
            "ours_share": sum(v for k, v in split.items() if k.startswith("patchattn")) / total,
            **operator_profile(step, ids.device, top)}


def to_markdown(report: dict) -> str:
    head = report["setup"]
    lines = ["# One eager decode step: where the time goes", "",
             f"{head['layers']} layers ({head['shape']}), batch {head['batch']}, {head['prompt']} keys after the "
             f"prefill, {head['device']}, {head['dtype']}; environment: `{json.dumps(report['environment'])}`", "",
             "Host split: one step under cProfile (its overhead inflates Python time: read the shares); 'X -> C' "
             "is time in built-in calls (torch operators, kernel launches, synchronisations) made from X's code.",
             ""]
    for name, entry in report["methods"].items():
        lines += [f"## {name}", ""]
        if "error" in entry:
            lines += [f"error: {entry['error']}", ""]
            continue
        kernels = entry["device_kernels_ms"]
        lines += [f"step {entry['step_ms_median']:.2f} ms (median, min {entry['step_ms_min']:.2f}); "
                  f"device kernels {'-' if kernels is None else f'{kernels:.2f} ms'}; "
                  f"patchattn owns {100 * entry['ours_share']:.0f}% of the profiled host time", ""]
        split = [{"owner": k, "ms": v, "share": f"{100 * entry['host_split_share'][k]:.1f}%"}
                 for k, v in entry["host_split_ms"].items()]
        lines += [markdown_table(split, ["owner", "ms", "share"]), ""]
        lines += [markdown_table(entry["host_ops"], ["name", "calls", "self_cpu_ms"]), ""]
        if entry["device_kernels"]:
            lines += [markdown_table(entry["device_kernels"], ["name", "calls", "device_ms"]), ""]
    return "\n".join(lines)


def main_profile(args) -> int:
    """``--profile-step PATH``: the first length and batch, every method in ``--methods``."""
    from ..api import parse_methods
    from .generate import DTYPES, _repatch, build_model, describe, release

    length, batch = int(args.lengths.split(",")[0]), int(args.batch.split(",")[0])
    model = build_model(args.layers, length + args.profile_steps + 8, shape=args.shape, device=args.device,
                        dtype=DTYPES[args.dtype])
    gen = torch.Generator().manual_seed(length)
    ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=gen).to(model.device)
    report = {"environment": {**environment(), "command": " ".join(sys.argv)},
              "setup": {"layers": args.layers, "shape": args.shape, "batch": batch, "prompt": length,
                        "device": str(model.device), "dtype": args.dtype}, "methods": {}}
    for label, method, overrides in parse_methods(args.methods):
        error = _repatch(model, method, overrides)
        try:
            if error:
                raise RuntimeError(error)
            report["methods"][label] = profile_method(model, ids, args.profile_steps)
        except Exception as err:  # one method's failure does not lose the others
            report["methods"][label] = {"error": describe(err)}
        finally:
            release(model, "dynamic")
        print(f"{label}: {report['methods'][label].get('step_ms_median', report['methods'][label].get('error'))}",
              flush=True)
    _repatch(model, "dense", {})
    base = Path(args.profile_step)
    base.parent.mkdir(parents=True, exist_ok=True)
    base.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    base.with_suffix(".md").write_text(to_markdown(report) + "\n", encoding="utf-8")
    print(f"wrote {base.with_suffix('.json')} and {base.with_suffix('.md')}")
    return 0
