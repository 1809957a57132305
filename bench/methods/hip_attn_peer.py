# On a CUDA GPU, from the repository root:
#   python3 bench/methods/hip_attn_peer.py .whl/hip_attn-1.2.9-py3-none-any.whl --T 32768,131072 [--decode-T 131072]
#       --json out.json
"""The `hip-attn` package's own HiP kernel (v1.1, the ICLR'25 paper's algorithm) timed beside SDPA and our `hip` on
the same random inputs: prefill attention (mask search included) and, with ``--decode-T``, decode steps (a search
every 8 steps, reused in between, for both), bf16, Llama-3-8B attention shapes (32 q / 8 kv heads, head_dim 128).

hip-attn pins torch 2.5 and imports opencv, nvtx, numba, cupy and its own model files at package import, none of
which the GPU machine has or our torch 2.11 / transformers 5 can load; its kernels are Triton. So the wheel is
unpacked (never installed or vendored), its package ``__init__`` is skipped, and the few import-time names its v1.1
module touches (``nvtx.annotate``, ``numba.njit``/``prange``, ``cv2``) are stubbed; the kernel itself runs as shipped
with the paper's settings (mask_k 512, query block 32, key block 2, 256-token window, 16 sink tokens).

Triton >= 3.4 no longer accepts a plain ``str`` as the *default* of a constexpr parameter of a jit function called
from another one (``inspect.getcallargs`` hands the raw string to the code generator: "'str' object has no
attribute 'type'"); hip-attn's v1.1 kernels have such defaults (``EXTEND_BACKEND: tl.constexpr =
DEFAULT_EXTEND_BACKEND``).  Two more Triton 3.6 changes break it: a jit function may no longer reference a plain
Python function (its bitonic argsort calls ``core.get_int_dtype``), and ``tl.flip(x)`` without ``dim`` fails its own
static assert before resolving the default.  ``_triton36_shims`` fixes all three in memory after import (str defaults
wrapped as ``tl.constexpr``; the argsort module's ``core`` replaced by a copy whose ``get_int_dtype`` is a
``constexpr_function``; ``flip``'s default ``dim`` set to -1, its documented meaning); no kernel source is changed.
Found by compiling for sm_90 on a CPU with Triton 3.6 (``JITFunction.cache_key`` over every hip-attn jit function,
and small kernels through ``triton.compile``)."""
import argparse
import contextlib
import json
import sys
import tempfile
import time
import traceback
import types
import zipfile

import torch


def _stub_modules():
    nvtx = types.ModuleType("nvtx")
    class _Annotate(contextlib.ContextDecorator):
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False
    nvtx.annotate = _Annotate
    numba = types.ModuleType("numba")
    numba.njit = lambda *a, **k: (a[0] if a and callable(a[0]) else (lambda fn: fn))
    numba.prange = range
    cv2 = types.ModuleType("cv2")
    for name, mod in (("nvtx", nvtx), ("numba", numba), ("cv2", cv2)):
        sys.modules.setdefault(name, mod)


def _wrap_string_defaults(prefix="hip_attn"):
    """Wrap str defaults of every jit function in the loaded ``prefix`` modules as tl.constexpr; returns how many."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction
    fixed = 0
    for name, module in list(sys.modules.items()):
        if not name.startswith(prefix) or module is None:
            continue
        for value in list(vars(module).values()):
            while value is not None and not isinstance(value, JITFunction):
                value = getattr(value, "fn", None)  # autotune / heuristics wrappers
            if value is None or not value.fn.__defaults__:
                continue
            defaults = value.fn.__defaults__
            if any(isinstance(d, str) for d in defaults):
                value.fn.__defaults__ = tuple(tl.constexpr(d) if isinstance(d, str) else d for d in defaults)
                fixed += 1
    return fixed


def _triton36_shims():
    """Make hip-attn's v1.1 kernels compile under Triton 3.6 (see the module docstring); returns what was changed."""
    import triton.language.core as core
    import triton.language.standard as standard
    from triton.runtime.jit import constexpr_function
    changed = [f"str defaults wrapped in {_wrap_string_defaults()} jit functions"]
    argsort = sys.modules.get("hip_attn.utils.triton_argsort")
    if argsort is not None and not isinstance(getattr(argsort.core, "get_int_dtype", None), type(standard._get_int_dtype)):
        shim = types.ModuleType("hip_attn_triton_core_shim")
        shim.__dict__.update(vars(core))
        shim.get_int_dtype = constexpr_function(core.get_int_dtype)
        argsort.core = shim
        changed.append("argsort's core.get_int_dtype as a constexpr_function")
    if standard.flip.fn.__defaults__ == (None,):
        standard.flip.fn.__defaults__ = (-1,)
        changed.append("tl.flip's default dim = -1")
    return changed


def load_hip_attn(wheel: str):
    root = tempfile.mkdtemp(prefix="hip_attn_")
    zipfile.ZipFile(wheel).extractall(root)
    _stub_modules()
    pkg = types.ModuleType("hip_attn")
    pkg.__path__ = [f"{root}/hip_attn"]
    sys.modules["hip_attn"] = pkg
    import importlib
    module = importlib.import_module("hip_attn.v1_1.attention2_draft_prefetch")
    importlib.import_module("hip_attn.utils.triton_argsort")
    print("hip-attn under Triton 3.6:", "; ".join(_triton36_shims()), flush=True)
    return module


def synced_calls_ms(fn, calls=6):
    """Wall milliseconds of single synchronised calls (after the first): shows whether later calls still compile."""
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(round((time.perf_counter() - start) * 1e3, 2))
    return times


def decode_row(hip, T, batch, refresh=8):
    """One decode step at a T-key cache: ours (`hip`, as `patchattn bench methods` times it: search every ``refresh``
    steps, lists reused in between, eager and CUDA-graphed) and hip-attn (a mask search every step, and its
    ``previous_metadata`` reuse, weighted the same way), next to SDPA."""
    from patchattn.bench.kernel import graph_ms, time_ms
    from patchattn.bench.methods import decode_rows
    ours = decode_rows(T, batch, [("hip", "hip", {})])[0]
    row = dict(mode="decode", T=T, B=batch, sdpa_ms=ours["sdpa_ms"], sdpa_graph_ms=ours["sdpa_graph_ms"],
               ours_step_ms=ours["total_ms"], ours_graph_ms=ours["graph_ms"], ours_density=ours["density"],
               ours_vs_sdpa=ours["sdpa_ms"] / ours["total_ms"], ours_graph_vs_sdpa=ours["sdpa_graph_ms"] / ours["graph_ms"])
    if hip is None:
        return row
    q = torch.randn(batch, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, T, 32, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))  # no GQA in v1.1
    hargs = hip.HiPAttentionArgs(mask_k=512, block_size_q=32, block_stride_q=2, block_size_k=2, block_stride_k=1,
                                 sliding_window_size=256, sink_token_size=16, is_causal=True)
    try:
        _out, meta = hip.hip_attention(q, k, v, args=hargs)
        search = time_ms(lambda: hip.hip_attention(q, k, v, args=hargs))
        reuse = time_ms(lambda: hip.hip_attention(q, k, v, args=hargs, previous_metadata=meta))
        row.update(hip_attn_search_ms=search, hip_attn_reuse_ms=reuse,
                   hip_attn_step_ms=(search + (refresh - 1) * reuse) / refresh)
        row["hip_attn_vs_sdpa"] = row["sdpa_ms"] / row["hip_attn_step_ms"]
        try:
            g_search = graph_ms(lambda: hip.hip_attention(q, k, v, args=hargs))
            g_reuse = graph_ms(lambda: hip.hip_attention(q, k, v, args=hargs, previous_metadata=meta))
            row["hip_attn_graph_ms"] = (g_search + (refresh - 1) * g_reuse) / refresh
            row["hip_attn_graph_vs_sdpa"] = row["sdpa_graph_ms"] / row["hip_attn_graph_ms"]
        except Exception as e:  # its step syncs with the host or allocates in a way capture refuses
            row["hip_attn_graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    except Exception:
        traceback.print_exc()
        row["hip_attn_error"] = traceback.format_exc(limit=4)[-1500:]
    return row


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("wheel")
    p.add_argument("--T", default="32768,131072")
    p.add_argument("--block-size-q", type=int, default=32)
    p.add_argument("--decode-T", type=int, default=0, help="also time decode steps at this cache length (0: no)")
    p.add_argument("--decode-batches", default="1,8")
    p.add_argument("--json")
    args = p.parse_args(argv)
    rows = []
    try:
        hip = load_hip_attn(args.wheel)
    except Exception:
        traceback.print_exc()
        rows.append(dict(stage="import", error=traceback.format_exc(limit=3)))
        hip = None
    from patchattn.bench.kernel import time_ms
    from patchattn.bench.methods import _select, _state
    from patchattn.kernels.blocksparse import block_sparse_attention
    for T in [int(x) for x in args.T.split(",") if x]:
        q = torch.randn(1, 32, T, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, 8, T, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        sdpa = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                  enable_gqa=True))
        row = dict(T=T, sdpa_ms=sdpa)
        state = _state("hip", {})  # ours, defaults, its selection included (as `patchattn bench methods`)
        idx, cnt = _select("hip", state, q, k)
        blk = state.config.block_size
        row["ours_hip_select_ms"] = time_ms(lambda: _select("hip", state, q, k))
        row["ours_hip_kernel_ms"] = time_ms(lambda: block_sparse_attention(q, k, v, idx, cnt, block_q=blk,
                                                                           block_k=blk, backend="triton"))
        row["ours_hip_vs_sdpa"] = sdpa / (row["ours_hip_select_ms"] + row["ours_hip_kernel_ms"])
        if hip is not None:
            # hip-attn takes [B, T, H, D]; it has no GQA argument in v1.1, so K/V are repeated to the q heads.
            qt = q.transpose(1, 2).contiguous()
            kt, vt = (x.repeat_interleave(4, dim=1).transpose(1, 2).contiguous() for x in (k, v))
            hargs = hip.HiPAttentionArgs(mask_k=512, block_size_q=args.block_size_q, block_stride_q=2,
                                         block_size_k=2, block_stride_k=1, sliding_window_size=256,
                                         sink_token_size=16, is_causal=True)
            try:
                start = time.time()
                out, _meta = hip.hip_attention(qt, kt, vt, args=hargs)
                torch.cuda.synchronize()
                row["hip_attn_first_call_s"] = time.time() - start
                row["hip_attn_calls_ms"] = synced_calls_ms(lambda: hip.hip_attention(qt, kt, vt, args=hargs))
                row["hip_attn_ms"] = time_ms(lambda: hip.hip_attention(qt, kt, vt, args=hargs))
                row["hip_attn_vs_sdpa"] = sdpa / row["hip_attn_ms"]
                row["hip_attn_out_finite"] = bool(torch.isfinite(out).all())
            except Exception:
                traceback.print_exc()
                row["hip_attn_error"] = traceback.format_exc(limit=4)[-1500:]
        rows.append(row)
        print(json.dumps(row), flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    if args.decode_T:
        for batch in [int(x) for x in args.decode_batches.split(",")]:
            rows.append(decode_row(hip, args.decode_T, batch))
            print(json.dumps(rows[-1]), flush=True)
            torch.cuda.empty_cache()
    if args.json:
        json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), open(args.json, "w"),
                  indent=1)


if __name__ == "__main__":
    main()
