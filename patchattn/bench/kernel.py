"""Kernel benchmark: block-sparse attention vs SDPA (dense causal) vs FlexAttention (same mask).

One run produces the whole table: forward, forward+backward and decode, at several sequence
lengths, densities and head dims, plus peak memory and a correctness check of each sparse point
against FlexAttention given the *same* block mask (the two must compute the same function).

    python -m patchattn.bench.kernel --csv bench/kernel/results.csv       # full table (GPU)
    python patchattn/bench/kernel.py --quick                              # works without patchattn deps

Kernel launch options (``KernelOptions``) are passed to every call: ``--no-autotune`` takes the first fitting config,
``--decode-programs-per-sm`` sets the split-K target; the kernels themselves on the full block set are timed with
``dense_fallback=False``.

``main(argv) -> int`` is what ``patchattn bench kernel`` calls.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time

import torch

from ..report import environment

FIELDS = ["mode", "T", "D", "B", "Hq", "Hkv", "block", "layers", "density_target", "density", "impl", "ms",
          "tflops", "peak_mib", "max_err", "vs_sdpa", "vs_flex", "bwd_fwd", "note"]


def _kernels():
    """The kernels package, without importing the rest of patchattn when that is not installed."""
    try:
        from patchattn import kernels
    except Exception:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
        import kernels  # type: ignore[no-redef]
    return kernels


def _blocksparse():
    """The block-sparse kernel package (see :func:`_kernels`)."""
    import importlib

    return importlib.import_module(_kernels().__name__ + ".blocksparse")


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def random_causal_lists(bs, heads, T, block, density, device, seed=0):
    """Per-head sorted key-block lists keeping ``density`` of the causally allowed blocks of each
    query block (at least one); the diagonal block is always kept, so no row is empty."""
    n = math.ceil(T / block)
    allowed = bs.causal_block_counts(T, T, block, block, device).long()  # [NQ]
    keep = torch.clamp(torch.round(density * allowed.double()).long(), min=1)
    gen = torch.Generator(device=device).manual_seed(seed)
    score = torch.rand(heads, n, n, device=device, generator=gen)
    cols = torch.arange(n, device=device)
    score = torch.where(cols == (allowed - 1)[:, None], -1.0, score)   # diagonal first
    score = torch.where(cols >= allowed[:, None], 2.0, score)          # never pick invisible
    width = int(keep.max())
    chosen = score.argsort(dim=-1)[..., :width]
    valid = torch.arange(width, device=device) < keep[:, None]
    chosen = torch.where(valid, chosen, n + cols[:width]).sort(dim=-1).values
    chosen = torch.where(valid, chosen, 0)
    counts = keep.expand(heads, n)
    return chosen[None].to(torch.int32).contiguous(), counts[None].to(torch.int32).contiguous()


def backward_points(bs, densities, head_dims=(128, 64), lengths=(16384, 65536), heads=(32, 8), block=128,
                    options=None):
    """The points of the backward scripts (``bench/kernel/*/``): bf16 inputs at every head_dim x length, lists
    at every density, the sparse kernel's forward outputs and time (the dense fallback off, so a full list is timed
    through the kernel too) and ``split_backward()``, the backward of that point.  ``options``: the kernels'
    ``KernelOptions`` (default: the defaults)."""
    import importlib
    from types import SimpleNamespace

    triton_bwd = importlib.import_module(bs.__name__ + ".triton_bwd")
    options = (options or _kernels().KernelOptions()).replace(dense_fallback=False)

    n_q, n_kv = heads
    for d in head_dims:
        for T in lengths:
            q, k, v, d_out = (torch.randn(1, h, T, d, device="cuda", dtype=torch.bfloat16)
                              for h in (n_q, n_kv, n_kv, n_q))
            for density in densities:
                idx, cnt = lists_at_density(bs, n_kv, T, block, density, "cuda")

                def forward():
                    return bs.block_sparse_attention(q, k, v, idx, cnt, block_q=block, block_k=block, return_lse=True,
                                                     options=options)
                fwd_ms = time_ms(forward)
                out, lse = forward()
                p = SimpleNamespace(D=d, T=T, density=density, q=q, k=k, v=v, d_out=d_out, idx=idx, cnt=cnt,
                                    block=block, n_q_heads=n_q, out=out, lse=lse, fwd_ms=fwd_ms,
                                    opts=bs.Options(block, block, True, d ** -0.5, None, options))
                p.split_backward = lambda p=p: triton_bwd.backward(
                    p.d_out, p.q, p.k, p.v, p.out, p.lse, p.idx, p.cnt, p.opts, None, None, None, None, None)
                yield p
                del p, out, lse


def flex_backward(flex, p):
    """FlexAttention on point ``p``'s mask (a ``backward_points`` point; ``flex`` a compiled flex_attention):
    (forward ms, backward ms, (dq, dk, dv))."""
    mask = flex_block_mask(p.idx, p.cnt, p.T, p.block, p.n_q_heads)
    qf, kf, vf = (t.clone().requires_grad_(True) for t in (p.q, p.k, p.v))
    fwd_ms = time_ms(lambda: flex(qf, kf, vf, block_mask=mask, enable_gqa=True))
    out = flex(qf, kf, vf, block_mask=mask, enable_gqa=True)
    bwd_ms = time_ms(lambda: torch.autograd.grad(out, (qf, kf, vf), p.d_out, retain_graph=True))
    return fwd_ms, bwd_ms, torch.autograd.grad(out, (qf, kf, vf), p.d_out)


def lists_at_density(bs, heads, T, block, density, device):
    """The lists of a benchmark point: at ``density`` >= 1 the full causal set as ``causal_blocks`` makes it (one
    list for every head, known full, so ``auto`` computes it with SDPA without a host check), else random per-head
    lists."""
    if density >= 1.0:
        return bs.causal_blocks(T, T, block, block, device)
    return random_causal_lists(bs, heads, T, block, density, device)


def random_decode_lists(heads, batch, Tk, block, density, device, seed=0):
    """Decode lists: ``density`` of all key blocks, always including the newest one."""
    n = math.ceil(Tk / block)
    keep = max(1, round(density * n))
    gen = torch.Generator(device=device).manual_seed(seed)
    score = torch.rand(batch, heads, 1, n, device=device, generator=gen)
    score[..., -1] = -1.0
    chosen = score.argsort(dim=-1)[..., :keep].sort(dim=-1).values
    counts = torch.full((batch, heads, 1), keep, device=device, dtype=torch.int32)
    return chosen.to(torch.int32).contiguous(), counts


def flex_block_mask(idx, cnt, T, block, n_q_heads):
    """The same lists as a FlexAttention BlockMask: the diagonal block is the only partial one."""
    from torch.nn.attention.flex_attention import BlockMask

    group = n_q_heads // idx.shape[1]
    idx, cnt = idx.repeat_interleave(group, 1), cnt.repeat_interleave(group, 1)
    n = math.ceil(T / block)
    full_idx = torch.zeros(*idx.shape[:3], n, dtype=torch.int32, device=idx.device)
    full_idx[..., :idx.shape[-1]] = idx  # the last listed block (the diagonal) is past full_cnt
    diag = torch.arange(n, dtype=torch.int32, device=idx.device).view(1, 1, n, 1)
    part_idx = torch.zeros_like(full_idx)
    part_idx[..., :1] = diag
    part_cnt = torch.ones_like(cnt)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return BlockMask.from_kv_blocks(part_cnt, part_idx, cnt - 1, full_idx, BLOCK_SIZE=block,
                                    mask_mod=causal, seq_lengths=(T, T))


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def time_ms(fn):
    """Median milliseconds; long calls are timed a few times only."""
    import triton

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    once = start.elapsed_time(end)
    if once > 40:
        runs = []
        for _ in range(3):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            runs.append(start.elapsed_time(end))
        return sorted(runs)[1]
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def peak_mib(fn):
    """Peak memory a call adds on top of what is allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def loop_ms(fn, calls=50, warmup=1):
    """Milliseconds per call of ``calls`` back-to-back calls with one sync at the end: no L2 flush, host time
    included (a host-bound call shows here and not in :func:`graph_ms`)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e3


def graph_ms(fn):
    """Time CUDA-graph replays of fn (removes Python launch overhead, as a serving loop would)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_ms(graph.replay)


def rel_err(a, b):
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, args):
        self.args = args
        self.bs = _blocksparse()
        self.options = _kernels().KernelOptions(autotune=not args.no_autotune,
                                                decode_programs_per_sm=args.decode_programs_per_sm)
        self.kernel_only = self.options.replace(dense_fallback=False)  # the kernels themselves, also on the full set
        self.rows = []
        self.sink = self.sink_file = None
        self.flex = self.flex_grad = None
        if not args.no_flex:
            import torch._dynamo
            from torch.nn.attention.flex_attention import flex_attention
            # one compiled graph per shape and grad mode: keep dynamo from giving up (and falling
            # back to the unfused flex, which materialises the scores)
            torch._dynamo.config.recompile_limit = 64
            torch._dynamo.config.cache_size_limit = 64
            self.flex = torch.compile(flex_attention, dynamic=False)
            self.flex_grad = torch.compile(flex_attention, dynamic=False)

    def add(self, **row):
        row = {k: row.get(k, "") for k in FIELDS}
        self.rows.append(row)
        if self.sink is not None:  # rows reach the file as they come: a cut-off run keeps them
            self.sink.writerow(row)
            self.sink_file.flush()
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items() if v != ""}
        print(json.dumps(shown), flush=True)

    # -- prefill ----------------------------------------------------------------------------
    def prefill(self, T, D, mode):
        a, bs = self.args, self.bs
        Hq, Hkv, blk = a.heads, a.kv_heads, a.block
        group = Hq // Hkv
        grad = mode == "fwdbwd"
        q = torch.randn(1, Hq, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
        k = torch.randn(1, Hkv, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
        v = torch.randn(1, Hkv, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
        k_rep = k.detach().repeat_interleave(group, 1).requires_grad_(grad)
        v_rep = v.detach().repeat_interleave(group, 1).requires_grad_(grad)
        d_out = torch.randn(1, Hq, T, D, device="cuda", dtype=torch.bfloat16)
        flops = 4 * Hq * T * T / 2 * D * (3.5 if grad else 1.0)  # causal; bwd = 2.5 x fwd

        def timed(fn):
            if not grad:
                return fn
            return lambda: torch.autograd.grad(fn(), (q, k, v) if fn is not sdpa else
                                               (q, k_rep, v_rep), d_out)

        def sdpa():
            return torch.nn.functional.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True)

        common = dict(mode=mode, T=T, D=D, B=1, Hq=Hq, Hkv=Hkv, block=blk)
        t_sdpa = time_ms(timed(sdpa))
        ctx = torch.no_grad() if not grad else torch.enable_grad()
        with ctx:
            self.add(**common, density_target=1.0, density=1.0, impl="sdpa", ms=t_sdpa,
                     tflops=flops / t_sdpa / 1e9, peak_mib=peak_mib(timed(sdpa)), vs_sdpa=1.0)
            if mode == "fwd":
                def sdpa_gqa():
                    return torch.nn.functional.scaled_dot_product_attention(
                        q, k, v, is_causal=True, enable_gqa=True)
                t = time_ms(sdpa_gqa)
                self.add(**common, density_target=1.0, density=1.0, impl="sdpa_enable_gqa", ms=t,
                         tflops=flops / t / 1e9, vs_sdpa=t_sdpa / t)
            for dens in a.densities:
                self.prefill_point(common, q, k, v, d_out, T, D, dens, t_sdpa, flops, grad, timed)
            if mode == "fwd":  # fixed cost: empty lists (launch, list scan, zero writes)
                idx, cnt = bs.causal_blocks(T, T, blk, blk, "cuda")
                empty = torch.zeros_like(cnt)
                t = time_ms(lambda: bs.block_sparse_attention(q, k, v, idx, empty, block_q=blk,
                                                              block_k=blk, options=self.options))
                self.add(**common, density_target=0.0, density=0.0, impl="ours_empty", ms=t,
                         note="fixed overhead")

    def prefill_point(self, common, q, k, v, d_out, T, D, dens, t_sdpa, flops, grad, timed):
        a, bs = self.args, self.bs
        blk = a.block
        idx, cnt = lists_at_density(bs, a.kv_heads, T, blk, dens, "cuda")
        actual = bs.density(cnt, T, T, blk, blk, True)
        point = dict(common, density_target=dens, density=actual)

        def ours(options=self.options):
            return bs.block_sparse_attention(q, k, v, idx, cnt, block_q=blk, block_k=blk, options=options)

        t_ours = time_ms(timed(ours))
        out_ours = ours().detach() if not grad else None
        t_flex, out_flex = None, None
        flex_ok = self.flex is not None and (not grad or T <= a.flex_bwd_max_t)
        if flex_ok:
            mask = flex_block_mask(idx, cnt, T, blk, a.heads)

            flex_fn = self.flex_grad if grad else self.flex

            def flex():
                return flex_fn(q, k, v, block_mask=mask, enable_gqa=True)

            t_flex = time_ms(timed(flex))
            out_flex = flex().detach() if not grad else None
            self.add(**point, impl="flex", ms=t_flex, tflops=flops * actual / t_flex / 1e9,
                     peak_mib=peak_mib(timed(flex)), vs_sdpa=t_sdpa / t_flex)
        err = rel_err(out_ours, out_flex) if out_flex is not None else ""
        if grad and flex_ok and T <= 16384:  # gradient check against flex at full size
            g_ours = torch.autograd.grad(ours(), (q, k, v), d_out)
            g_flex = torch.autograd.grad(flex(), (q, k, v), d_out)
            err = max(rel_err(x, y) for x, y in zip(g_ours, g_flex))
        dense_path = bs._use_dense_fallback(q, k, idx, cnt, bs.Options(blk, blk, True, D ** -0.5, None, self.options),
                                            None, None, None, None, False)
        self.add(**point, impl="ours", ms=t_ours, tflops=flops * actual / t_ours / 1e9,
                 peak_mib=peak_mib(timed(ours)), max_err=err, vs_sdpa=t_sdpa / t_ours,
                 vs_flex=(t_flex / t_ours) if t_flex else "", note="sdpa fallback" if dense_path else "")
        if dens >= 1.0:  # the kernel itself on the full set (fallback off)
            def ours_kernel():
                return ours(self.kernel_only)

            t = time_ms(timed(ours_kernel))
            err = "" if grad else rel_err(ours_kernel().detach(), timed(
                lambda: torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=True, enable_gqa=True))())
            self.add(**point, impl="ours_kernel", ms=t, tflops=flops / t / 1e9,
                     peak_mib=peak_mib(timed(ours_kernel)), max_err=err, vs_sdpa=t_sdpa / t,
                     vs_flex=(t_flex / t) if t_flex else "")

    # -- backward alone ---------------------------------------------------------------------
    def backward(self, T, D):
        """Backward pass alone, after one forward, next to SDPA's and Flex's; the ``bwd_fwd`` column is each backward
        over the same implementation's forward."""
        import importlib

        a, bs = self.args, self.bs
        triton_bwd = importlib.import_module(bs.__name__ + ".triton_bwd")
        Hq, Hkv, blk = a.heads, a.kv_heads, a.block
        group = Hq // Hkv
        q, k, v, d_out = (torch.randn(1, h, T, D, device="cuda", dtype=torch.bfloat16)
                          for h in (Hq, Hkv, Hkv, Hq))
        common = dict(mode="bwd", T=T, D=D, B=1, Hq=Hq, Hkv=Hkv, block=blk)
        leaves = [t.clone().requires_grad_(True) for t in (q, k.repeat_interleave(group, 1),
                                                           v.repeat_interleave(group, 1))]
        sdpa_fwd = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True))
        out = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True)
        t = time_ms(lambda: torch.autograd.grad(out, leaves, d_out, retain_graph=True))
        self.add(**common, density_target=1.0, density=1.0, impl="sdpa_bwd", ms=t, bwd_fwd=t / sdpa_fwd,
                 note=f"fwd {sdpa_fwd:.3f} ms")
        del out, leaves
        for dens in a.densities:
            idx, cnt = lists_at_density(bs, Hkv, T, blk, dens, "cuda")
            point = dict(common, density_target=dens, density=bs.density(cnt, T, T, blk, blk, True))
            opts = bs.Options(blk, blk, True, D ** -0.5, None, self.kernel_only)  # the kernels, also on the full set
            fwd = time_ms(lambda: bs.block_sparse_attention(q, k, v, idx, cnt, block_q=blk, block_k=blk,
                                                            return_lse=True, options=self.kernel_only))
            out, lse = bs.block_sparse_attention(q, k, v, idx, cnt, block_q=blk, block_k=blk, return_lse=True,
                                                 options=self.kernel_only)

            def bwd():
                return triton_bwd.backward(d_out, q, k, v, out, lse, idx, cnt, opts, None, None, None, None, None)
            t = time_ms(bwd)
            self.add(**point, impl="ours_bwd_split", ms=t, bwd_fwd=t / fwd, peak_mib=peak_mib(bwd),
                     note=f"fwd {fwd:.3f} ms")
            del out, lse
            if self.flex is not None and T <= a.flex_bwd_max_t:
                mask = flex_block_mask(idx, cnt, T, blk, Hq)
                qf, kf, vf = (t.clone().requires_grad_(True) for t in (q, k, v))
                t_fwd = time_ms(lambda: self.flex_grad(qf, kf, vf, block_mask=mask, enable_gqa=True))
                out = self.flex_grad(qf, kf, vf, block_mask=mask, enable_gqa=True)
                t = time_ms(lambda: torch.autograd.grad(out, (qf, kf, vf), d_out, retain_graph=True))
                self.add(**point, impl="flex_bwd", ms=t, bwd_fwd=t / t_fwd, note=f"fwd {t_fwd:.3f} ms")
                del out

    # -- decode -----------------------------------------------------------------------------
    def decode(self, B, T, D):
        """One decode call per layer of ``--decode-layers`` (each layer its own cache, as in a model): times are
        per layer; with several layers a graph holds them all, so its launch is paid once per token, as in a
        captured model step, not once per attention call."""
        a, bs = self.args, self.bs
        Hq, Hkv, blk, L = a.heads, a.kv_heads, a.block, a.decode_layers
        q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.bfloat16)
        caches = [tuple(torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
                  for _ in range(L)]
        k, v = caches[0]
        common = dict(mode="decode", T=T, D=D, B=B, Hq=Hq, Hkv=Hkv, block=blk, layers=L)
        kv_bytes = 2 * B * Hkv * T * D * 2

        def every_layer(attend):
            return lambda: [attend(k_l, v_l) for k_l, v_l in caches][-1]

        def per_layer_ms(fn):
            return time_ms(fn) / L, graph_ms(fn) / L

        sdpa = every_layer(lambda k_l, v_l: torch.nn.functional.scaled_dot_product_attention(
            q, k_l, v_l, enable_gqa=True))
        with torch.no_grad():
            t_sdpa, g_sdpa = per_layer_ms(sdpa)
            self.add(**common, density_target=1.0, density=1.0, impl="sdpa", ms=t_sdpa,
                     tflops=kv_bytes / t_sdpa / 1e9, peak_mib=peak_mib(sdpa), vs_sdpa=1.0,
                     note="tflops column = TB/s of K/V read")
            self.add(**common, density_target=1.0, density=1.0, impl="sdpa_graph", ms=g_sdpa,
                     vs_sdpa=t_sdpa / g_sdpa)
            for dens in a.decode_densities:
                idx, cnt = random_decode_lists(Hkv, B, T, blk, dens, "cuda")
                actual = float(cnt[0, 0, 0]) / math.ceil(T / blk)
                ours = every_layer(lambda k_l, v_l: bs.block_sparse_attention(q, k_l, v_l, idx, cnt, block_q=16,
                                                                              block_k=blk, options=self.options))
                ref = bs.block_sparse_attention(q, k, v, idx, cnt, block_q=16, block_k=blk,
                                                backend="torch")
                got = bs.block_sparse_attention(q, k, v, idx, cnt, block_q=16, block_k=blk, options=self.options)
                t, g = per_layer_ms(ours)
                point = dict(common, density_target=dens, density=actual)
                self.add(**point, impl="ours", ms=t, tflops=kv_bytes * actual / t / 1e9,
                         peak_mib=peak_mib(ours), max_err=rel_err(got, ref), vs_sdpa=t_sdpa / t)
                self.add(**point, impl="ours_graph", ms=g, tflops=kv_bytes * actual / g / 1e9,
                         vs_sdpa=g_sdpa / g, note="vs_sdpa against sdpa_graph")

    def run(self):
        """Forward first, then decode, then forward+backward (the slowest part last)."""
        a = self.args
        jobs = []
        if "fwd" in a.modes:
            jobs += [(self.prefill, (T, D, "fwd")) for D in a.head_dims for T in a.T]
        if "decode" in a.modes:
            jobs += [(self.decode, (B, T, D)) for D in a.head_dims for B in a.decode_batches
                     for T in a.decode_T]
        if "bwd" in a.modes:
            jobs += [(self.backward, (T, D)) for D in a.head_dims for T in a.T if T <= a.bwd_max_t]
        if "fwdbwd" in a.modes:
            jobs += [(self.prefill, (T, D, "fwdbwd")) for D in a.head_dims for T in a.T
                     if T <= a.bwd_max_t]
        for fn, job_args in jobs:
            try:
                fn(*job_args)
            except Exception as exc:
                print(f"FAILED {fn.__name__}{job_args}: {type(exc).__name__}: {exc}", flush=True)
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _ints(text):
    return [int(x) for x in text.split(",") if x]


def _floats(text):
    return [float(x) for x in text.split(",") if x]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="patchattn bench kernel", description=__doc__.split("\n")[0])
    p.add_argument("--T", type=_ints, default=[4096, 16384, 65536, 131072], help="sequence lengths")
    p.add_argument("--densities", type=_floats, default=[1.0, 0.5, 0.1, 0.02])
    p.add_argument("--head-dims", type=_ints, default=[64, 128])
    p.add_argument("--modes", default="fwd,fwdbwd,decode", help="any of fwd,fwdbwd,decode,bwd (bwd: the backward "
                   "alone, after one forward)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--block", type=int, default=128, help="block size (FlexAttention's is 128)")
    p.add_argument("--decode-batches", type=_ints, default=[1, 8])
    p.add_argument("--decode-T", type=_ints, default=[32768, 131072])
    p.add_argument("--decode-densities", type=_floats, default=[1.0, 0.05])
    p.add_argument("--decode-layers", type=int, default=1,
                   help="decode calls per timed step, each with its own KV cache (a model's layers); times per layer")
    p.add_argument("--bwd-max-t", type=int, default=131072, help="skip fwd+bwd above this T")
    p.add_argument("--flex-bwd-max-t", type=int, default=16384,
                   help="FlexAttention fwd+bwd only up to this T (its compile is slow)")
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--no-autotune", action="store_true",
                   help="KernelOptions(autotune=False): the first launch config that fits, no timing of configs")
    p.add_argument("--decode-programs-per-sm", type=int, default=None,
                   help="KernelOptions.decode_programs_per_sm: the split-K target (default: the measured rule)")
    p.add_argument("--quick", action="store_true", help="T=4k,16k, d=128, densities 1, 0.1")
    p.add_argument("--csv", help="write the rows here")
    p.add_argument("--json", help="write rows and run metadata here")
    args = p.parse_args(argv)
    if args.quick:
        args.T, args.head_dims, args.densities = [4096, 16384], [128], [1.0, 0.1]
        args.decode_T, args.decode_batches = [32768], [1, 8]
    args.modes = args.modes.split(",")
    return args


def tuned_configs(bs):
    """The launch configs the autotuner chose in this run (kernel, key constexprs -> config)."""
    import importlib

    fwd = importlib.import_module(bs.__name__ + ".triton_fwd")
    keep = ("HEAD_DIM", "BQ", "BK", "CAUSAL", "GROUP", "ROWS")
    out = []
    for (name, _dev, dtype, consts), cfg in fwd.TUNED.items():
        key = {k: v for k, v in consts if k in keep}
        out.append(dict(kernel=name, dtype=str(dtype), **key, config=str(cfg)))
    return out


def metadata(argv):
    """The run's stamp: GPU, versions, source commit, date and the command."""
    return dict(environment(), gpu=torch.cuda.get_device_name(),
                command="python -m patchattn.bench.kernel " + " ".join(argv))


def print_table(rows):
    cols = ["mode", "T", "D", "B", "density", "impl", "ms", "tflops", "peak_mib", "vs_sdpa",
            "vs_flex", "max_err"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("patchattn bench kernel: needs a CUDA GPU (times SDPA, FlexAttention and the Triton "
              "kernels)", file=sys.stderr)
        return 2
    meta = metadata(argv)
    print(json.dumps(meta), flush=True)
    runner = Runner(args)
    meta["options"] = {name: getattr(runner.options, name) for name in runner.options.__dataclass_fields__}
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        runner.sink_file = open(args.csv, "w", newline="")
        runner.sink_file.write("# " + json.dumps(meta) + "\n")
        runner.sink = csv.DictWriter(runner.sink_file, fieldnames=FIELDS)
        runner.sink.writeheader()
    try:
        runner.run()
    finally:
        if runner.sink_file is not None:
            runner.sink_file.close()
    print_table(runner.rows)
    meta["tuned"] = tuned_configs(runner.bs)
    for entry in meta["tuned"]:
        print("tuned:", json.dumps(entry))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=runner.rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
