"""MoH speed: Mixture-of-Head attention vs dense SDPA vs our kernel with every head active, at Llama-3-8B attention
shapes (32 q / 8 kv heads, head_dim 128, bf16, causal prefill, batch 1).

Rows per length T and active ratio r (shared heads: the first half, as MoH-LLaMA3, for r > 0.5 -- 16 shared + 8
of 16 routed at r = 0.75; at r = 0.5, 8 shared + 8 of 24 routed):

* ``sdpa``: ``F.scaled_dot_product_attention`` (dense causal, GQA in place) -- the baseline.
* ``kernel-all``: our block-sparse kernel on the full causal set with ``active`` all True (so it cannot fall back to
  SDPA): the cost of our kernel doing everything.
* ``moh-token``: the ``moh`` method's routing (parameter-free query-norm router, top-k per token) + the kernel with
  its ``active`` / ``head_gain``.  The kernel skips a (query tile, head) only when no row of the tile is active, so
  per-token routing is expected to skip almost nothing (``tile_skip`` says how much it did).
* ``moh-block``: the same with ``route_block=128`` (each 128-token block shares the routing of its first token):
  whole tiles are skipped, the work falls to about ``r``.

Times are forward-only medians (ms) including the routing; ``vs_sdpa`` = sdpa_ms / ms, ``vs_kernel_all`` likewise.

    python -m patchattn.bench.moh --csv bench/moh/h200.csv            # CUDA GPU
    python -m patchattn.bench.moh --tiny                              # CPU smoke run of the script itself
"""

from __future__ import annotations

import argparse
import csv
import sys
import time

import torch

from ..kernels.blocksparse import block_sparse_attention, causal_blocks
from ..methods import moh
from ..report import environment, format_table
from ..state import PatchContext, PatchState

FIELDS = ["T", "ratio", "variant", "route_block", "ms", "vs_sdpa", "vs_kernel_all", "density", "tile_skip_64",
          "tile_skip_128", "max_err_vs_reference"]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m patchattn.bench.moh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="8192,32768,131072")
    p.add_argument("--ratios", default="0.5,0.75", help="fraction of all heads active per token")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--route-block", type=int, default=128, help="route_block of the moh-block rows")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: T=256, 4/2 heads, d=32, fp32, torch backend")
    p.add_argument("--csv")
    return p.parse_args(argv)


def _state(heads: int, ratio: float, route_block: int) -> PatchState:
    # Shared heads: half of all heads as MoH-LLaMA3 when more than half are active; at ratio <= 0.5 that would
    # leave no routed head active, so then half of the *active* heads are shared and the rest routed.
    shared = heads // 2 if ratio > 0.5 else round(ratio * heads / 2)
    config = moh.MoHConfig(active_ratio=ratio, route_block=route_block, shared_heads=shared)
    shared, routed, k = moh.head_plan(config, heads)
    plan = moh.MoHState(shared=torch.tensor(shared), routed=torch.tensor(routed), top_k=k)
    return PatchState(config, layer_index=0, role="text", context=PatchContext(), method_state=plan)


def _timer(device: str):
    if device == "cuda":
        from .kernel import time_ms

        return time_ms

    def cpu_ms(fn, repeats=3):
        fn()
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - start) * 1e3)
        return sorted(runs)[len(runs) // 2]

    return cpu_ms


def _tile_skip(active: torch.Tensor, tile: int) -> float:
    batch, length, heads = active.shape
    tiles = -(-length // tile)
    padded = torch.nn.functional.pad(active, (0, 0, 0, tiles * tile - length))
    return float(1 - padded.view(batch, tiles, tile, heads).any(2).float().mean())


def rows_for(T, ratio, args, device, dtype, backend, timer):
    gen = torch.Generator(device=device).manual_seed(T)
    q = torch.randn(1, args.heads, T, args.head_dim, device=device, dtype=dtype, generator=gen)
    k = torch.randn(1, args.kv_heads, T, args.head_dim, device=device, dtype=dtype, generator=gen)
    v = torch.randn(1, args.kv_heads, T, args.head_dim, device=device, dtype=dtype, generator=gen)
    idx, cnt = causal_blocks(T, T, 64, 64, device=device)
    all_active = torch.ones(1, T, args.heads, dtype=torch.bool, device=device)

    def kernel(active=None, gain=None):
        return block_sparse_attention(q, k, v, idx, cnt, block_q=64, block_k=64, causal=True, head_gain=gain,
                                      active=active, backend=backend)

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                enable_gqa=args.heads != args.kv_heads)

    with torch.no_grad():
        sdpa_ms = timer(sdpa)
        kernel_ms = timer(lambda: kernel(all_active))
        reference = sdpa()
        rows = [{"T": T, "ratio": 1.0, "variant": "sdpa", "ms": sdpa_ms, "density": 1.0},
                {"T": T, "ratio": 1.0, "variant": "kernel-all", "ms": kernel_ms, "density": 1.0,
                 "max_err_vs_reference": float((kernel(all_active).float() - reference.float()).abs().max())}]
        for variant, block in (("moh-token", 1), ("moh-block", args.route_block)):
            state = _state(args.heads, ratio, block)

            def run(state=state):
                state.method_state.balance_loss = state.method_state.last_selection = None
                gates, active = moh.route(state, q, v, None, None)
                out = moh.fused_moh(q, k, v, gates, active, scaling=args.head_dim ** -0.5, backend=backend,
                                    binary=True)
                return out, gates, active

            ms = timer(lambda: run()[0])
            if variant == "moh-token":  # what the gain path costs: the same call with the (binary) gates passed
                gates, active = moh.route(state, q, v, None, None)
                rows.append({"T": T, "ratio": ratio, "variant": "moh-token+gain", "route_block": block,
                             "ms": timer(lambda a=active, g=gates: kernel(a, g)), "density": float(active.float().mean())})
            out, gates, active = run()
            expected = reference * gates.transpose(1, 2)[..., None].to(reference.dtype)
            rows.append({"T": T, "ratio": ratio, "variant": variant, "route_block": block, "ms": ms,
                         "density": float(active.float().mean()), "tile_skip_64": _tile_skip(active, 64),
                         "tile_skip_128": _tile_skip(active, 128),
                         "max_err_vs_reference": float((out.float() - expected.float()).abs().max())})
    for row in rows:
        row["vs_sdpa"] = sdpa_ms / row["ms"]
        row["vs_kernel_all"] = kernel_ms / row["ms"]
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tiny:
        args.lengths, args.heads, args.kv_heads, args.head_dim = "256", 4, 2, 32
        device, dtype, backend = "cpu", torch.float32, "torch"
    elif not torch.cuda.is_available():
        print("bench moh needs a CUDA GPU (use --tiny for a CPU smoke run)", file=sys.stderr)
        return 2
    else:
        device, dtype, backend = "cuda", torch.bfloat16, "triton"
    timer = _timer(device)
    rows = []
    for T in (int(t) for t in args.lengths.split(",")):
        seen_dense = False
        for ratio in (float(r) for r in args.ratios.split(",")):
            new = rows_for(T, ratio, args, device, dtype, backend, timer)
            rows += new[2:] if seen_dense else new  # sdpa / kernel-all once per length
            seen_dense = True
            print(format_table(new[2:] if len(rows) > len(new) else new, FIELDS), file=sys.stderr, flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    print(format_table(rows, FIELDS))
    print(environment())
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows({f: row.get(f, "") for f in FIELDS} for row in rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
