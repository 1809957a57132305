"""Speed of the trained-state methods -- ``lightning`` (Lightning Attention-2), ``landmark`` and ``dma`` -- at
Llama-3-8B attention shapes (32 query / 8 KV heads, head_dim 128, bf16, batch 1), side by side in one run with SDPA
(the flash backend on CUDA; dense causal).

Modes (``--modes``; ms = median of CUDA-event timings, wall clock on the CPU):

- ``kernel`` / ``kernel-bwd``: the Lightning Attention-2 kernel alone (``kernels.lightning``, q/k/v of 32 heads, KV
  heads repeated as the method's callers do, ALiBi slopes), forward and forward+backward, against SDPA's causal
  forward and forward+backward at the same shape (GQA, 8 KV heads);
- ``paper``: the same forward at the shape of the paper's README table (batch 4, 32 heads, head_dim 128, no GQA;
  17.7 ms vs FlashAttention-2's 162.9 ms at 32k), at ``--paper-lengths``;
- ``prefill`` / ``prefill-bwd``: each method's whole attention layer (its own feature map / selection / bias and
  kernel, untrained initial parameters on a stand-in module; speed does not depend on them) at ``--lengths``,
  eval mode without gradients, and (``prefill-bwd``, linear methods only: the others' backward runs the engine's
  torch path) training mode forward+backward;
- ``decode-kernel``: one token through the Lightning kernel from a recurrent state (``[1, 32, 128, 128]`` float32),
  at every context of ``--decode-lengths`` (the state does not grow: these rows should be flat);
- ``decode``: one query per step against a KV cache of each context length: each method's layer (lightning
  continues its kept state, reading only the new key) against SDPA's decode on the same cache.

A row that fails (out of memory, a kernel error) keeps its place with the error in ``note``; rows are written to the
CSV after every length (a ``.json`` beside it holds the environment and the command).

    python -m patchattn.bench.linear --csv bench/linear/h200.csv                       # CUDA GPU (all modes)
    python -m patchattn.bench.linear --device cpu --dtype float32 --heads 4,2 --head-dim 16 \\
        --lengths 64,128 --decode-lengths 64,128 --paper-lengths 64 --csv /tmp/linear.csv      # CPU smoke

``hybrid`` is a model-level mix (softmax in 1 of every 8 layers): time it end to end with ``patchattn bench
generate --methods dense,hybrid,lightning`` (``bench/linear/reproduce.sh``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ..api import parse_methods
from ..kernels.lightning import alibi_slopes, lightning_attention
from ..registry import get_spec
from ..report import format_table, write_stamped_csv
from ..state import PatchContext, PatchState
from .dit import time_ms

FIELDS = ["mode", "method", "T", "B", "heads", "ms", "sdpa_ms", "speedup_vs_sdpa", "density", "note"]
MODES = ("kernel", "kernel-bwd", "paper", "prefill", "prefill-bwd", "decode-kernel", "decode")
LENGTHS = "4096,8192,16384,32768,65536,131072"


# ----------------------------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------------------------
class _Attention(nn.Module):
    """Stands for one attention module of a Llama-3-8B-shaped model: its config and a parameter (the methods read
    the device from it); the method's trainable state hangs on ``patchattn`` as in a patched model."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int, layers: int = 32):
        super().__init__()
        self.config = SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                                      hidden_size=heads * head_dim, num_hidden_layers=layers)
        self.head_dim = head_dim
        self.num_key_value_groups = heads // kv_heads  # what transformers' SDPA path reads (dense fallbacks)
        self.is_causal = True
        self.anchor = nn.Parameter(torch.zeros(()))


def method_layer(name: str, overrides: dict, heads, head_dim, device, layer: int = 0) -> _Attention:
    """A stand-in attention module patched with ``name`` (its state built as the adapter builds it), eval mode."""
    spec = get_spec(name)
    config = spec.config_cls(**overrides)
    module = _Attention(heads[0], heads[1], head_dim).to(device)
    context = PatchContext()
    if spec.make_state is not None:
        state = spec.make_state(module, config, layer, "text", context)
    else:
        state = PatchState(config, layer_index=layer, role="text", context=context)
    module.add_module("patchattn", state)
    return module.to(device).eval()


def call_layer(name: str, module, q, k, v):
    """The method's attention function as the adapter calls it (no mask: causal, unpadded), output ``[B, T, H, D]``."""
    out, _ = get_spec(name).forward(module, q, k, v, None, scaling=q.shape[-1] ** -0.5, dropout=0.0)
    return out


def qkv(batch, heads, T, head_dim, device, dtype, grad=False):
    gen = torch.Generator(device=device).manual_seed(T)  # on the device: a 128k tensor drawn on the CPU takes seconds
    make = lambda h: (torch.randn(batch, h, T, head_dim, generator=gen, device=device) * 0.5).to(dtype)
    q, k, v = make(heads[0]), make(heads[1]), make(heads[1])
    return tuple(x.requires_grad_(grad) for x in (q, k, v))


def _flash(device):
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def sdpa_fn(q, k, v, device, *, causal=True):
    """SDPA (flash on CUDA) on GQA inputs: with ``enable_gqa`` where the flash backend takes it, else on KV heads
    repeated beforehand (outside the timing); returns (fn, its input tensors, note)."""
    def run(kk, vv, **gqa):
        with _flash(device):
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=causal, **gqa)

    try:
        run(k, v, enable_gqa=True)
        return (lambda: run(k, v, enable_gqa=True)), (q, k, v), ""
    except RuntimeError:
        groups = q.shape[1] // k.shape[1]
        kk, vv = (x.detach().repeat_interleave(groups, 1).requires_grad_(x.requires_grad) for x in (k, v))
        return (lambda: run(kk, vv)), (q, kk, vv), "sdpa: KV heads repeated (no GQA in this flash backend)"


def backward_of(fn, inputs):
    """fn's forward + backward with a fixed output gradient (the inputs' gradients reset each call)."""
    def step():
        for x in inputs:
            x.grad = None
        out = fn()
        out.backward(torch.ones_like(out))
        return out
    return step


# ----------------------------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------------------------
def _row(mode, method, T, B, heads, ms=None, sdpa_ms=None, note=""):
    row = {"mode": mode, "method": method, "T": T, "B": B, "heads": f"{heads[0]}/{heads[1]}", "ms": ms,
           "sdpa_ms": sdpa_ms, "note": note}
    if ms and sdpa_ms:
        row["speedup_vs_sdpa"] = sdpa_ms / ms
    return row


def _failed(row, err):
    row["note"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    return row


def kernel_row(mode, T, batch, heads, head_dim, device, dtype):
    """The Lightning kernel alone (``kernel``, ``kernel-bwd``, ``paper``) against SDPA at the same shape."""
    row = _row(mode, "lightning-kernel", T, batch, heads)
    try:
        grad = mode == "kernel-bwd"
        q, k, v = qkv(batch, heads, T, head_dim, device, dtype, grad)
        groups = heads[0] // heads[1]
        slopes = torch.tensor(alibi_slopes(heads[0]), device=device)
        kx, vx = (x.detach().repeat_interleave(groups, 1).requires_grad_(grad) for x in (k, v))
        lightning = lambda: lightning_attention(q, kx, vx, slopes)[0]
        sdpa, sdpa_inputs, note = sdpa_fn(q, k, v, device)
        if grad:
            lightning, sdpa = backward_of(lightning, (q, kx, vx)), backward_of(sdpa, sdpa_inputs)
        row.update(_row(mode, "lightning-kernel", T, batch, heads, time_ms(lightning, device), time_ms(sdpa, device),
                        note))
    except Exception as err:  # noqa: BLE001 (a row, not a lost run)
        _failed(row, err)
    return row


def prefill_row(mode, label, name, overrides, T, heads, head_dim, device, dtype):
    row = _row(mode, label, T, 1, heads)
    try:
        grad = mode == "prefill-bwd"
        module = method_layer(name, overrides, heads, head_dim, device).to(dtype=torch.float32)
        module.train(grad)
        q, k, v = qkv(1, heads, T, head_dim, device, dtype, grad)
        layer = lambda: call_layer(name, module, q, k, v)
        sdpa, sdpa_inputs, note = sdpa_fn(q, k, v, device)
        if grad:
            layer, sdpa = backward_of(layer, (q, k, v)), backward_of(sdpa, sdpa_inputs)
            ms, sdpa_ms = time_ms(layer, device), time_ms(sdpa, device)
        else:
            with torch.no_grad():
                ms, sdpa_ms = time_ms(layer, device), time_ms(sdpa, device)
        row.update(_row(mode, label, T, 1, heads, ms, sdpa_ms, note), density=_density(module))
    except Exception as err:  # noqa: BLE001 (a row, not a lost run)
        _failed(row, err)
    return row


def decode_kernel_row(T, heads, head_dim, device, dtype, sdpa_ms):
    """One token through the Lightning kernel from a recurrent state (its size does not depend on ``T``)."""
    row = _row("decode-kernel", "lightning-kernel", T, 1, heads, sdpa_ms=sdpa_ms)
    try:
        q, k, v = (torch.randn(1, heads[0], 1, head_dim, device=device, dtype=dtype) for _ in "qkv")
        state = torch.randn(1, heads[0], head_dim, head_dim, device=device) * 0.01
        slopes = torch.tensor(alibi_slopes(heads[0]), device=device)
        with torch.no_grad():
            ms = time_ms(lambda: lightning_attention(q, k, v, slopes, state), device)
        row.update(_row("decode-kernel", "lightning-kernel", T, 1, heads, ms, sdpa_ms))
    except Exception as err:  # noqa: BLE001 (a row, not a lost run)
        _failed(row, err)
    return row


def decode_row(label, name, overrides, T, heads, head_dim, device, dtype, sdpa_ms):
    """One decode step of the method's layer against a cache of ``T`` keys (lightning: from its kept state)."""
    row = _row("decode", label, T, 1, heads, sdpa_ms=sdpa_ms)
    try:
        module = method_layer(name, overrides, heads, head_dim, device).to(dtype=torch.float32)
        _, k, v = qkv(1, heads, T, head_dim, device, dtype)
        q = torch.randn(1, heads[0], 1, head_dim, device=device, dtype=dtype)
        with torch.no_grad():
            step = _decode_step(name, module, q, k, v)
            ms = time_ms(step, device)
        row.update(_row("decode", label, T, 1, heads, ms, sdpa_ms), density=_density(module))
    except Exception as err:  # noqa: BLE001 (a row, not a lost run)
        _failed(row, err)
    return row


def _density(module):
    """The share of causal key blocks the method read in its latest call (None: it does not say, e.g. lightning)."""
    return module.patchattn.stats.get("density")


def _decode_step(name, module, q, k, v):
    kept = module.patchattn.method_state
    if not hasattr(kept, "kv"):  # no recurrent state: the method reads the cache every step
        return lambda: call_layer(name, module, q, k, v)
    # A prefill of the first T - 1 tokens leaves the state a decode step continues; each timed step starts there.
    T = k.shape[2]
    prompt_q = k[:, :1, : T - 1].expand(-1, q.shape[1], -1, -1)  # any queries: only the state is kept
    call_layer(name, module, prompt_q, k[:, :, : T - 1], v[:, :, : T - 1])
    saved = (kept.kv, kept.tokens, kept.last_key)

    def step():
        kept.kv, kept.tokens, kept.last_key = saved
        return call_layer(name, module, q, k, v)
    return step


def sdpa_decode_ms(T, heads, head_dim, device, dtype):
    _, k, v = qkv(1, heads, T, head_dim, device, dtype)
    q = torch.randn(1, heads[0], 1, head_dim, device=device, dtype=dtype)
    fn, _, _ = sdpa_fn(q, k, v, device, causal=False)
    with torch.no_grad():
        return time_ms(fn, device)


# ----------------------------------------------------------------------------------------------------------------
# Run
# ----------------------------------------------------------------------------------------------------------------
def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def run(args, sink=None) -> list[dict]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    heads, head_dim, modes = tuple(ints(args.heads)), args.head_dim, set(args.modes.split(","))
    methods = parse_methods(args.methods)
    rows = []

    def add(new):
        rows.append(new)
        print(format_table([new], FIELDS), file=sys.stderr, flush=True)

    for T in ints(args.lengths):
        for mode in ("kernel", "kernel-bwd"):
            if mode in modes:
                add(kernel_row(mode, T, 1, heads, head_dim, device, dtype))
        for label, name, overrides in methods:
            for mode in ("prefill", "prefill-bwd"):
                if mode in modes and (mode == "prefill" or get_spec(name).category == "linear"):
                    add(prefill_row(mode, label, name, overrides, T, heads, head_dim, device, dtype))
        _flush(device, sink, rows)
    if "paper" in modes:
        for T in ints(args.paper_lengths):
            add(kernel_row("paper", T, 4, (heads[0], heads[0]), head_dim, device, dtype))
            _flush(device, sink, rows)
    for T in ints(args.decode_lengths) if {"decode", "decode-kernel"} & modes else []:
        sdpa_ms = sdpa_decode_ms(T, heads, head_dim, device, dtype)
        if "decode-kernel" in modes:
            add(decode_kernel_row(T, heads, head_dim, device, dtype, sdpa_ms))
        if "decode" in modes:
            for label, name, overrides in methods:
                add(decode_row(label, name, overrides, T, heads, head_dim, device, dtype, sdpa_ms))
        _flush(device, sink, rows)
    return rows


def _flush(device, sink, rows):
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if sink:
        sink(rows)


def write_csv(path: str, rows: list[dict], argv) -> None:
    write_stamped_csv(path, rows, FIELDS, "python -m patchattn.bench.linear " + " ".join(argv))


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m patchattn.bench.linear", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="lightning;landmark;dma",
                   help="';'-separated 'name' or 'name:{json overrides}' (a label 'name@tag:{...}' keeps variants apart)")
    p.add_argument("--modes", default=",".join(MODES), help=f"','-separated among {', '.join(MODES)}")
    p.add_argument("--lengths", default=LENGTHS, help="prefill / kernel lengths")
    p.add_argument("--decode-lengths", default=LENGTHS, help="KV-cache lengths of the decode rows")
    p.add_argument("--paper-lengths", default="32768", help="lengths of the paper-shape rows (batch 4, 32 heads)")
    p.add_argument("--heads", default="32,8", help="query,kv heads (Llama-3-8B: 32,8)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--csv", help="write the rows here after every length (a .json beside it: environment, command)")
    args = p.parse_args(argv)
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown:
        p.error(f"unknown modes {sorted(unknown)}; known: {', '.join(MODES)}")
    if len(ints(args.heads)) != 2 or ints(args.heads)[0] % ints(args.heads)[1]:
        p.error("--heads must be 'query,kv' with kv dividing query")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    for _, name, _ in parse_methods(args.methods):
        get_spec(name)  # unknown names fail before anything runs, listing the known ones
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("patchattn bench linear needs a CUDA GPU (or --device cpu with small shapes)", file=sys.stderr)
        return 2
    sink = (lambda rows: write_csv(args.csv, rows, argv)) if args.csv else None
    rows = run(args, sink)
    print(format_table(rows, FIELDS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
