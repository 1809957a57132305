"""Launch configurations of the Lightning Attention-2 forward kernel at the lightning layer's real shape (CUDA GPU).

    python bench/linear/lightning_sweep.py --csv bench/linear/lightning_sweep.csv

The layer feeds the kernel 256 hedgehog features per head and 129 value columns (128 + the denominator) at
Llama-3-8B's 32 query heads; the kernel-alone rows of ``kernel.csv`` time head_dim 128 / 128. Each row: one
forward launch configuration (query/key rows per step ``block``, value columns per program ``block_e``, warps,
pipelining stages) in bf16, its median ms, the error against the default configuration, SDPA (flash, GQA 32/8,
head_dim 128) at the same length in the same run; a configuration that fails to compile or launch (e.g. shared
memory) is a row with its error. The first line of the CSV is a JSON stamp (commit, GPU, versions).
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import sys

import torch

FIELDS = ("T", "features", "values", "block", "block_e", "num_warps", "num_stages", "ms", "sdpa_ms", "vs_sdpa",
          "max_err", "note")
BLOCKS = (32, 64, 128)
BLOCK_E = (32, 64, 128)
WARPS = (4, 8)
STAGES = (1, 2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", default="bench/linear/lightning_sweep.csv")
    parser.add_argument("--lengths", default="32768")
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--values", type=int, default=129)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("lightning_sweep: needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    from patchattn.kernels.lightning import alibi_slopes
    from patchattn.kernels.lightning.triton_fwd import lightning_forward
    from patchattn.report import environment

    meta = dict(environment(), gpu=torch.cuda.get_device_name(), command="python bench/linear/lightning_sweep.py "
                + " ".join(sys.argv[1:] if argv is None else argv))
    os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    with open(args.csv, "w", newline="") as out:
        out.write("# " + json.dumps(meta) + "\n")
        sink = csv.DictWriter(out, fieldnames=FIELDS)
        sink.writeheader()
        heads, f, e = 32, args.features, args.values
        slopes = torch.tensor(alibi_slopes(heads), device="cuda")
        for T in (int(x) for x in args.lengths.split(",")):
            torch.manual_seed(0)
            # features are probabilities (hedgehog: two softmaxes over 128), values the layer's V plus a ones column
            q = torch.softmax(torch.randn(1, heads, T, f, device="cuda"), -1).bfloat16()
            k = torch.softmax(torch.randn(1, heads, T, f, device="cuda"), -1).bfloat16()
            v = torch.randn(1, heads, T, e, device="cuda").bfloat16()
            qs = torch.randn(1, 32, T, 128, device="cuda", dtype=torch.bfloat16)
            ks, vs = (torch.randn(1, 8, T, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            sdpa = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(
                qs, ks, vs, is_causal=True, enable_gqa=True), warmup=10, rep=100, return_mode="median")
            reference, _ = lightning_forward(q, k, v, slopes, out_dtype=torch.float32)
            base = dict(T=T, features=f, values=e, sdpa_ms=round(sdpa, 4))
            ms = triton.testing.do_bench(lambda: lightning_forward(q, k, v, slopes, out_dtype=torch.float32),
                                         warmup=5, rep=50, return_mode="median")
            sink.writerow(dict(base, note="default configuration", ms=round(ms, 4), vs_sdpa=round(sdpa / ms, 3)))
            for block, block_e, warps, stages in itertools.product(BLOCKS, BLOCK_E, WARPS, STAGES):
                row = dict(base, block=block, block_e=block_e, num_warps=warps, num_stages=stages)

                def call():
                    return lightning_forward(q, k, v, slopes, block=block, out_dtype=torch.float32, block_e=block_e,
                                             num_warps=warps, num_stages=stages)
                try:
                    got, _ = call()
                    ms = triton.testing.do_bench(call, warmup=5, rep=50, return_mode="median")
                    row.update(ms=round(ms, 4), vs_sdpa=round(sdpa / ms, 3),
                               max_err=f"{(got - reference).abs().max().item():.2e}")
                except Exception as exc:  # a configuration that does not fit is a row, the sweep goes on
                    row.update(note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                sink.writerow(row)
                out.flush()
                print(" | ".join(str(row.get(k, "")) for k in FIELDS), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
