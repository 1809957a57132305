# On a CUDA GPU: python3 bench/decode/host_profile.py OUTDIR [method ...]
"""Where an eager decode step's host time goes (128k keys, batch 1, Llama-3-8B attention shapes): for each method,
steps per second in a loop with one sync at the end (host-bound throughput), the same step replayed from a CUDA
graph (GPU time), and torch.profiler's CPU-side table over 50 steps (every torch op and Triton launch) with cProfile's
Python functions over 200 more."""
import cProfile
import io
import os
import pstats
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from patchattn.bench import methods as bench
from patchattn.bench.kernel import graph_ms, loop_ms


def loop_us(step):
    return loop_ms(step, calls=200, warmup=10) * 1e3


def main(out, names):
    os.makedirs(out, exist_ok=True)
    T = 131072
    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, T, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
    print(f"sdpa: eager loop {loop_us(sdpa):.1f} us/step, graph {graph_ms(sdpa) * 1e3:.1f} us")
    for name in names:
        state = bench._state(name, {})
        for kind, step in bench._decode_steps(name, state, q, k, v).items():
            eager = loop_us(step)
            graphed = graph_ms(step) * 1e3
            print(f"{name}/{kind}: eager loop {eager:.1f} us/step, graph {graphed:.1f} us")
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(50):
                    step()
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
            python = cProfile.Profile()
            python.enable()
            for _ in range(200):
                step()
            torch.cuda.synchronize()
            python.disable()
            text = io.StringIO()
            pstats.Stats(python, stream=text).sort_stats("tottime").print_stats(35)
            with open(os.path.join(out, f"profile_{name}_{kind}.txt"), "w") as handle:
                handle.write(table + "\n\n# cProfile, 200 steps, by own time\n" + text.getvalue())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or ["streaming", "blocktopk", "hip"])
