"""Sweep the block-sparse forward's launch configs and logical block sizes on one GPU: where does the engine's
throughput (TFLOP/s of listed, visible attention) stand against SDPA's on the same GPU, and which config and block
shape close the gap?  (Issue 21: gna/radial are bounded by the engine's dense throughput on Hopper, ~265 TFLOP/s vs
cuDNN's ~570 on an H100, and the DiT methods use 64-token blocks, which cap the tile at 64 rows.)

    python bench/kernel/engine_sweep.py --csv bench/kernel/engine_sweep.csv [--budget 540]

Shapes (bf16, B=1, head_dim 128): ``dit`` non-causal 32k tokens, 40 heads (Wan-like), random lists keeping 25% of the
key blocks of each query block; ``llm`` causal 32k, 32 q / 8 kv heads, 50% of the causal blocks (diagonal kept).
Block pairs (query block, key block): 64x64, 128x64, 128x128.  Per pair: the autotuned launch, then every config of
the grid below that fits (``KernelOptions.forward_config``), each timed by ``triton.testing.do_bench`` (median).
TFLOP/s counts 4*D per visible (query, key) pair of the listed blocks.  SDPA (dense, same shape) is timed once per
shape; its TFLOP/s counts every visible pair of the dense problem.

Plan rows (``--plans``): real DiT plans (gna defaults, gna tile mode, radial's released Wan setting in block mode,
64- and 128-token tiles) at Wan 720p and FLUX-4K, the engine alone on the plan's tiles (tokens already permuted),
autotuned, partial-tile masks predicated (the default) and behind a branch (``tile_mask_branch``), beside SDPA.
(Query blocks merged two into one were timed at commit 1ccd699 and lost on every plan: design note 59.)
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import sys
import time

import torch

SHAPES = {
    "dit": dict(T=32768, Hq=40, Hkv=40, causal=False, density=0.25),
    "llm": dict(T=32768, Hq=32, Hkv=8, causal=True, density=0.5),
}
BLOCKS = [(64, 64), (128, 64), (128, 128)]
GRID = [(m, n, w, s) for m, n, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))]
FIELDS = ["shape", "block_q", "block_k", "config", "ms", "tflops", "vs_sdpa", "max_err", "note"]
PLANS = {  # name: (bench.dit shape, method, config overrides)
    "wan_gna": ("wan-720p", "gna", {}),
    "wan_gna_tile": ("wan-720p", "gna", {"granularity": "tile"}),
    "wan_radial_block": ("wan-720p", "radial", {"dense_first_steps": 0, "dense_band": 0, "decay_factor": 0.2,
                                                "first_frame_sink": True, "granularity": "block"}),
    "flux4k_gna": ("flux-4k", "gna", {}),
    "wan_gna_tile128": ("wan-720p", "gna", {"granularity": "tile", "tile_tokens": 128}),
    "wan_radial_block128": ("wan-720p", "radial", {"dense_first_steps": 0, "dense_band": 0, "decay_factor": 0.2,
                                                   "first_frame_sink": True, "granularity": "block", "block": 128}),
}


def random_lists(n_q, n_k, block_q, block_k, heads, density, causal, device, seed=0):
    """Per-head sorted key-block lists: ``density`` of the blocks each query block may see (causal: those at or
    before its last row), at least one; causal lists always keep the diagonal block."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    width = n_k
    idx = torch.zeros(1, heads, n_q, width, dtype=torch.int32)
    cnt = torch.zeros(1, heads, n_q, dtype=torch.int32)
    for m in range(n_q):
        allowed = min(n_k, ((m + 1) * block_q + block_k - 1) // block_k) if causal else n_k
        keep = max(1, round(density * allowed))
        for h in range(heads):
            pick = torch.randperm(allowed, generator=gen)[:keep]
            if causal:
                pick = torch.unique(torch.cat([pick[: keep - 1], torch.tensor([allowed - 1])]))
            pick = pick.sort().values
            idx[0, h, m, : pick.numel()] = pick.to(torch.int32)
            cnt[0, h, m] = pick.numel()
    return idx.to(device), cnt.to(device)


def visible_pairs(idx, cnt, T, block_q, block_k, causal):
    """Visible (query, key) pairs of the listed blocks, summed over heads."""
    rows = torch.arange(T)
    n_q, n_k = math.ceil(T / block_q), math.ceil(T / block_k)
    starts = torch.arange(n_k) * block_k
    widths = (torch.clamp(T - starts, max=block_k))  # keys in each key block
    if causal:
        per_row = torch.clamp(rows[:, None] - starts[None, :] + 1, min=0)
        per_row = torch.minimum(per_row, widths[None, :])
    else:
        per_row = widths[None, :].expand(T, n_k)
    pad = n_q * block_q - T
    table = torch.nn.functional.pad(per_row, (0, 0, 0, pad)).view(n_q, block_q, n_k).sum(1)  # [n_q, n_k]
    idx, cnt = idx.cpu().long(), cnt.cpu()
    listed = torch.arange(idx.shape[-1])[None, None, None, :] < cnt[..., None]
    gathered = table[torch.arange(n_q)[None, None, :, None], idx]
    return int((gathered * listed).sum())


def plan_tiles(name):
    """The TiledMask a DiT method plans for one attention call at a benchmark shape, and the shape."""
    from patchattn.bench.dit import SHAPES as DIT_SHAPES
    from patchattn.bench.dit import _module, _tiled_mask
    from patchattn.registry import get_spec

    shape_name, method, overrides = PLANS[name]
    shape = DIT_SHAPES[shape_name]
    module = _module(shape, method, overrides).to("cuda")
    q = torch.randn(1, shape.heads, shape.tokens, shape.head_dim, device="cuda", dtype=torch.bfloat16)
    get_spec(method).forward(module, q, q, q, None, scaling=None, dropout=0.0, is_causal=False,
                             cross_attention=False, enable_gqa=False)
    return _tiled_mask(module.patchattn), shape


def plan_rows(name, triton):
    """Engine time on a DiT plan's tiles, partial-tile masks predicated and behind a branch."""
    from patchattn.kernels import KernelOptions
    from patchattn.masks.tiles import tiled_attention

    tiled, shape = plan_tiles(name)
    heads, D = shape.heads, shape.head_dim
    q, k, v = (torch.randn(1, heads, tiled.q_len, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    t_sdpa = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), warmup=5,
                                     rep=60, return_mode="median")
    rows = [dict(shape=name, config="sdpa", ms=round(t_sdpa, 4),
                 tflops=round(4 * D * tiled.q_len * tiled.k_len * heads / t_sdpa / 1e9, 1))]
    reference = None
    listed, partial = tiled.tile_counts()
    pairs = tiled.density() * tiled.q_len * tiled.k_len * heads
    for branch in (False, True):
        options = KernelOptions(dense_fallback=False, tile_mask_branch=branch)
        got = tiled_attention(q, k, v, tiled, options=options)
        reference = got if reference is None else reference
        err = float((got.float() - reference.float()).abs().max())
        ms = triton.testing.do_bench(lambda: tiled_attention(q, k, v, tiled, options=options), warmup=5, rep=60,
                                     return_mode="median")
        label = f"autotuned, tile masks {'behind a branch' if branch else 'predicated'}"
        rows.append(dict(shape=name, block_q=tiled.block_q, block_k=tiled.block_k, config=label,
                         ms=round(ms, 4), tflops=round(4 * D * pairs / ms / 1e9, 1), vs_sdpa=round(t_sdpa / ms, 3),
                         max_err=f"{err:.2e}",
                         note=f"tile density {tiled.tile_density():.3f}, partial {partial}/{listed}"))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", default="bench/kernel/engine_sweep.csv")
    parser.add_argument("--shapes", default="dit,llm")
    parser.add_argument("--plans", default=",".join(PLANS),
                        help="DiT plans timed on the engine ('' for none)")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds; stops starting new points after it")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("engine_sweep: needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    from patchattn.kernels import KernelOptions
    from patchattn.kernels.blocksparse import block_sparse_attention
    from patchattn.report import environment

    start = time.time()
    meta = dict(environment(), gpu=torch.cuda.get_device_name(), command="python bench/kernel/engine_sweep.py "
                + " ".join(sys.argv[1:] if argv is None else argv))
    os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    out = open(args.csv, "w", newline="")
    out.write("# " + json.dumps(meta) + "\n")
    sink = csv.DictWriter(out, fieldnames=FIELDS)
    sink.writeheader()

    def emit(**row):
        row = {k: row.get(k, "") for k in FIELDS}
        sink.writerow(row)
        out.flush()
        print(" | ".join(str(row[k]) for k in FIELDS), flush=True)

    for name in filter(None, args.plans.split(",")):
        if time.time() - start > args.budget:
            break
        for row in plan_rows(name, triton):
            emit(**row)
    D = 128
    for name in filter(None, args.shapes.split(",")):
        shape = SHAPES[name]
        T, Hq, Hkv, causal = shape["T"], shape["Hq"], shape["Hkv"], shape["causal"]
        torch.manual_seed(0)
        q = torch.randn(1, Hq, T, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, Hkv, T, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, Hkv, T, D, device="cuda", dtype=torch.bfloat16)
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal,  # noqa: E731
                                                                        enable_gqa=Hq != Hkv)
        t_sdpa = triton.testing.do_bench(sdpa, warmup=10, rep=100, return_mode="median")
        dense_pairs = T * (T + 1) // 2 if causal else T * T
        emit(shape=name, config="sdpa", ms=round(t_sdpa, 4), tflops=round(4 * D * dense_pairs * Hq / t_sdpa / 1e9, 1))
        for block_q, block_k in BLOCKS:
            n_q, n_k = math.ceil(T / block_q), math.ceil(T / block_k)
            idx, cnt = random_lists(n_q, n_k, block_q, block_k, Hkv, shape["density"], causal, "cuda")
            flops = 4 * D * visible_pairs(idx, cnt, T, block_q, block_k, causal) * (Hq // Hkv)

            def call(options):
                return block_sparse_attention(q, k, v, idx, cnt, block_q=block_q, block_k=block_k, causal=causal,
                                              options=options)

            reference = call(KernelOptions(dense_fallback=False))
            configs = [None] + [c + (False,) for c in GRID if c[0] <= block_q and c[1] <= block_k]
            for config in configs:
                if time.time() - start > args.budget:
                    emit(shape=name, block_q=block_q, block_k=block_k, note="budget spent: stopped")
                    out.close()
                    return 0
                options = KernelOptions(dense_fallback=False, forward_config=config)
                label = "autotuned" if config is None else "m{}_n{}_w{}_s{}".format(*config[:4])
                try:
                    got = call(options)
                    err = float((got.float() - reference.float()).abs().max())
                    ms = triton.testing.do_bench(lambda: call(options), warmup=5, rep=60, return_mode="median")
                except Exception as exc:  # out of shared memory and the like: a row with its error
                    emit(shape=name, block_q=block_q, block_k=block_k, config=label, note=type(exc).__name__)
                    continue
                emit(shape=name, block_q=block_q, block_k=block_k, config=label, ms=round(ms, 4),
                     tflops=round(flops / ms / 1e9, 1), vs_sdpa=round(t_sdpa / ms, 3), max_err=f"{err:.2e}")
        del q, k, v
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
