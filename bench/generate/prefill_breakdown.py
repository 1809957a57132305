"""Where a long prefill's time goes: one forward of a Llama-3-8B-shaped model (random bf16 weights) per method, wall
time and GPU time per kernel family (attention kernels, GEMMs, everything else), so the time to first token's
ceiling is measured rather than assumed: a method that reads almost nothing (``streaming``) leaves only the model's
own non-attention work.

    python bench/generate/prefill_breakdown.py --layers 4 --length 131072 --out prefill_breakdown.json \
        --methods 'sdpa;hip;hip@{"dense_layers": []};blocktopk;streaming'
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

import patchattn
from patchattn.bench.generate import build_model
from patchattn.report import environment

ATTENTION = ("sdpa", "flash", "_fwd_kernel", "_tree_search", "_prefill_", "attention")
GEMM = ("nvjet", "gemm", "cutlass", "sm90_xmma")


def family(kernel: str) -> str:
    name = kernel.lower()
    if any(tag in name for tag in ATTENTION):
        return "attention"
    if any(tag in name for tag in GEMM):
        return "gemm"
    return "other"


def measure(model, ids, spec: str) -> dict:
    name, _, options = spec.partition("@")
    options = json.loads(options) if options else {}
    context = patchattn.patched(model, name, **options) if name != "sdpa" else torch.no_grad()
    with torch.no_grad(), context:
        def forward():
            return model(input_ids=ids, use_cache=True, logits_to_keep=1)
        forward()
        torch.cuda.synchronize()
        start = time.perf_counter()
        forward()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            forward()
            torch.cuda.synchronize()
    kernels = sorted(((e.key, e.self_device_time_total / 1e3) for e in prof.key_averages()
                      if e.self_device_time_total > 0), key=lambda kv: -kv[1])
    by_family: dict = {}
    for kernel, ms in kernels:
        by_family[family(kernel)] = by_family.get(family(kernel), 0.0) + ms
    return {"method": spec, "wall_ms": 1e3 * wall, "gpu_ms": sum(ms for _, ms in kernels),
            "gpu_ms_by_family": by_family, "top_kernels": [[k[:90], ms] for k, ms in kernels[:12]]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--length", type=int, default=131072)
    p.add_argument("--methods", default='sdpa;hip;blocktopk;streaming', help="';'-separated, 'name@{json options}'")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    model = build_model(args.layers, args.length + 64)
    ids = torch.randint(3, 120000, (1, args.length), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    rows = []
    for spec in args.methods.split(";"):
        rows.append(measure(model, ids, spec))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "top_kernels"}), flush=True)
    with open(args.out, "w") as f:
        json.dump({"environment": environment(), "layers": args.layers, "length": args.length, "rows": rows}, f,
                  indent=1)


if __name__ == "__main__":
    main()
