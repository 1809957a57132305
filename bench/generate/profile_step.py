"""Where an eager decode step's time goes (CUDA GPU): one step of a Llama-3-8B-shaped model after a prefill, SDPA vs
sparse methods, wall time per step and the top host-side (self CPU) operators from ``torch.profiler``.

    python bench/generate/profile_step.py OUT.txt [--layers 8] [--prompt 32768] [--methods dense,blocktopk,streaming]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from patchattn.api import patch, unpatch  # noqa: E402
from patchattn.bench.generate import llama3_8b_shaped  # noqa: E402
from patchattn.report import environment  # noqa: E402


def step_after_prefill(model, prompt: int):
    """A function running one decode step on the cache a ``prompt``-token prefill left (each call grows it by one
    token, as decoding does: the methods' between-step caches stay valid)."""
    ids = torch.randint(3, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0)).cuda()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        token = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)

    def step():
        with torch.no_grad():
            return model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)

    return step, cache


def time_steps(step, cache, repeats: int = 20) -> float:
    """Median wall ms of one step."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


def profile(step) -> str:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32768)
    parser.add_argument("--methods", default="dense,blocktopk,streaming")
    args = parser.parse_args(argv)
    model = llama3_8b_shaped(args.layers, args.prompt + 64)
    lines = [f"# {environment()} command: {' '.join(sys.argv)}"]
    for method in args.methods.split(","):
        handle = patch(model, method) if method != "dense" else None
        try:
            step, cache = step_after_prefill(model, args.prompt)
            time_steps(step, cache, repeats=3)  # warm-up
            lines.append(f"\n## {method}: median {time_steps(step, cache):.2f} ms per decode step "
                         f"({args.layers} layers, {args.prompt} keys, batch 1)\n")
            lines.append(profile(step))
        finally:
            if handle is not None:
                unpatch(model)
        print("\n".join(lines[-2:]), flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
