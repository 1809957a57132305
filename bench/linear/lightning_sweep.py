"""Launch configurations of the Lightning Attention-2 forward kernel at the lightning layer's real shape (CUDA GPU).

    python bench/linear/lightning_sweep.py --csv bench/linear/lightning_sweep.csv

The layer feeds the kernel 256 hedgehog features per head and 129 value columns (128 + the denominator) at
Llama-3-8B's 32 query heads; the kernel-alone rows of ``kernel.csv`` time head_dim 128 / 128. Each row: one
forward launch configuration (query/key rows per step ``block``, value columns per program ``block_e``, warps,
pipelining stages) in bf16, its median ms, the error against the default configuration, SDPA (default backend,
GQA 32/8, head_dim 128) at the same length in the same run; a configuration that fails to compile or launch (e.g. shared
memory) is a row with its error; each configuration runs in a process of its own (a CUDA error sticks to its
process). The first line of the CSV is a JSON stamp (commit, GPU, versions).
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import subprocess
import sys

import torch

FIELDS = ("T", "features", "values", "block", "block_e", "num_warps", "num_stages", "ms", "sdpa_ms", "vs_sdpa",
          "max_err", "note")
BLOCKS = (32, 64, 128)
BLOCK_E = (32, 64, 128)
WARPS = (4, 8)
STAGES = (1, 2)


def _inputs(T, heads, f, e):
    torch.manual_seed(0)
    # features are probabilities (hedgehog: two softmaxes over 128), values the layer's V plus a ones column
    q = torch.softmax(torch.randn(1, heads, T, f, device="cuda"), -1).bfloat16()
    k = torch.softmax(torch.randn(1, heads, T, f, device="cuda"), -1).bfloat16()
    v = torch.randn(1, heads, T, e, device="cuda").bfloat16()
    return q, k, v


def one_configuration(T, f, e, block, block_e, warps, stages) -> dict:
    """Times one launch configuration against the default one (run in a process of its own: a CUDA error sticks to
    the process and would fail every later configuration)."""
    import triton

    from patchattn.kernels.lightning import alibi_slopes
    from patchattn.kernels.lightning.triton_fwd import lightning_forward

    heads = 32
    slopes = torch.tensor(alibi_slopes(heads), device="cuda")
    q, k, v = _inputs(T, heads, f, e)
    reference, _ = lightning_forward(q, k, v, slopes, out_dtype=torch.float32)

    def call():
        return lightning_forward(q, k, v, slopes, block=block, out_dtype=torch.float32, block_e=block_e,
                                 num_warps=warps, num_stages=stages)
    try:
        got, _ = call()
        ms = triton.testing.do_bench(call, warmup=5, rep=50, return_mode="median")
        return dict(ms=round(ms, 4), max_err=f"{(got - reference).abs().max().item():.2e}")
    except Exception as exc:  # a configuration that does not fit is a row, the sweep goes on
        return dict(note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")


def sdpa_ms(T) -> float:
    import triton

    qs = torch.randn(1, 32, T, 128, device="cuda", dtype=torch.bfloat16)
    ks, vs = (torch.randn(1, 8, T, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(
        qs, ks, vs, is_causal=True, enable_gqa=True), warmup=10, rep=100, return_mode="median")


def _in_child(T, f, e, config) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--one", ",".join(str(x) for x in (T, f, e, *config))]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return dict(note="timed out (120 s)")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(note=f"process failed: {tail[:120]}")
    return json.loads(lines[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", default="bench/linear/lightning_sweep.csv")
    parser.add_argument("--lengths", default="32768")
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--values", type=int, default=129)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # T,F,E,block,block_e,warps,stages: one child process
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("lightning_sweep: needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.one:
        print(json.dumps(one_configuration(*(int(x) for x in args.one.split(",")))))
        return 0
    import triton

    from patchattn.kernels.lightning import alibi_slopes
    from patchattn.kernels.lightning.triton_fwd import lightning_forward
    from patchattn.report import environment

    meta = dict(environment(), gpu=torch.cuda.get_device_name(), command="python bench/linear/lightning_sweep.py "
                + " ".join(sys.argv[1:] if argv is None else argv))
    os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    f, e = args.features, args.values
    slopes = torch.tensor(alibi_slopes(32), device="cuda")
    with open(args.csv, "w", newline="") as out:
        out.write("# " + json.dumps(meta) + "\n")
        sink = csv.DictWriter(out, fieldnames=FIELDS)
        sink.writeheader()
        for T in (int(x) for x in args.lengths.split(",")):
            sdpa = sdpa_ms(T)
            q, k, v = _inputs(T, 32, f, e)
            ms = triton.testing.do_bench(lambda: lightning_forward(q, k, v, slopes, out_dtype=torch.float32),
                                         warmup=5, rep=50, return_mode="median")
            base = dict(T=T, features=f, values=e, sdpa_ms=round(sdpa, 4))
            sink.writerow(dict(base, note="default configuration", ms=round(ms, 4), vs_sdpa=round(sdpa / ms, 3)))
            for config in itertools.product(BLOCKS, BLOCK_E, WARPS, STAGES):
                row = dict(base, block=config[0], block_e=config[1], num_warps=config[2], num_stages=config[3])
                row.update(_in_child(T, f, e, config))
                if row.get("ms"):
                    row["vs_sdpa"] = round(sdpa / row["ms"], 3)
                sink.writerow(row)
                out.flush()
                print(" | ".join(str(row.get(k, "")) for k in FIELDS), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
