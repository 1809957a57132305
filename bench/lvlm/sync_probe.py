"""Where the LVLM methods' prefill time goes on a GPU (issue 22; design note 54): one LLaVA-1.5-7B-shaped prefill per
method with PyTorch's synchronisation warnings on (each synchronising call -- ``.item()``, ``nonzero``, a blocking
copy -- printed with its stack), then a profiler table of the same prefill (host-side CUDA calls such as
``cudaStreamSynchronize`` / ``cudaMemcpyAsync``, and the top kernels).  A CUDA GPU, about a minute:

    python bench/lvlm/sync_probe.py [--methods dense,var,vhr,paint,composite] [--out bench/lvlm/sync_probe.txt]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import warnings

import torch

import patchattn
from patchattn.bench.lvlm import SHAPES, build
from patchattn.report import environment


def probe(model, inputs, name: str, out) -> None:
    def prefill():
        with torch.no_grad():
            model(**inputs, logits_to_keep=1)
        torch.cuda.synchronize()

    with patchattn.patched(model, name):
        prefill()  # warm-up: autotuning, compilation
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                prefill()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
        print(f"== {name}: {len(syncs)} synchronising calls in one prefill", file=out)
        for line in syncs[:40]:
            print("   ", line, file=out)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            prefill()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), file=out)
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=10), file=out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="dense,var,vhr,paint,composite")
    p.add_argument("--shape", default="llava-576", choices=sorted(SHAPES))
    p.add_argument("--out", default=None, help="write the report here (default: stdout)")
    args = p.parse_args(argv)
    model, inputs = build(SHAPES[args.shape], None)
    model = model.to("cuda", torch.bfloat16).eval()
    inputs = {k: v.to("cuda", torch.bfloat16 if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
    buffer = io.StringIO()
    print(f"# {environment()}", file=buffer)
    for name in args.methods.split(","):
        probe(model, inputs, name, buffer)
    with open(args.out, "w") if args.out else contextlib.nullcontext() as handle:
        print(buffer.getvalue(), file=handle)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
