"""Context-parallel prefill against one GPU: attention alone and whole decoder layers, all-gather vs ring.

    torchrun --nproc_per_node 2 bench/distributed/context_parallel.py \\
        --tokens 262144 524288 --methods dense hip blocktopk streaming --csv bench/distributed/context_parallel.csv

Two measurements per (method, prompt length), on every rank's GPU:

- ``attention``: one patched attention call at Llama-3-8B shapes (32 query heads, 8 KV heads, head dim 128, bf16,
  random Q/K/V): the whole prompt on one GPU, against each rank's tokens with the K/V exchange (``allgather``:
  one collective; ``ring``: point-to-point steps with the chunks computed as their keys arrive;
  ``ring_attention``, ``dense`` only: shards dropped after use, partial outputs merged by log-sum-exp).  ``max_err``: the
  largest difference between a rank's rows and the one-GPU rows.
- ``model``: a forward of a Llama-3-8B-shaped model with ``--layers`` decoder layers (random weights,
  ``logits_to_keep=1``: no logits over the whole prompt), divided by the layers: ``ms`` is per layer.

``one_gpu_ms`` is the same work on one GPU (every rank runs it on its own GPU; rank 0's time is written).
``speedup`` = one_gpu_ms / ms (2.0 is perfect on 2 GPUs).  A configuration that fails (out of memory) writes its
error and the next one runs.  Rows go to ``--csv`` with a first comment line stamping GPU, versions and commit.

On CPU (``--device cpu --shape tiny``, gloo) the same code runs at tiny sizes: tests/distributed/
test_context_parallel_bench.py checks it that way; the times then mean nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

import patchattn
from patchattn.distributed import BALANCES, EXCHANGES, context_parallel
from patchattn.report import environment

SHAPES = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, rope_theta=500000.0),
    "tiny": dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2),
}
COLUMNS = ["mode", "method", "tokens", "layers", "world", "exchange", "balance", "ms", "one_gpu_ms", "speedup",
           "peak_gib", "max_err", "error"]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[262144, 524288])
    p.add_argument("--methods", nargs="+", default=["dense", "hip", "blocktopk", "streaming"])
    p.add_argument("--exchanges", nargs="+", default=list(EXCHANGES), choices=EXCHANGES)
    p.add_argument("--balance", default="zigzag", choices=BALANCES)
    p.add_argument("--modes", nargs="+", default=["attention", "model"], choices=["attention", "model"])
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the 'model' measurement")
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--method-args", default="{}", help='JSON per method, e.g. \'{"hip": {"dense_layers": []}}\'')
    p.add_argument("--csv", default=None)
    return p.parse_args(argv)


def build_model(shape: str, layers: int, tokens: int, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], num_hidden_layers=layers, max_position_embeddings=max(tokens, 256))
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int, barrier: bool) -> tuple[float, object]:
    """Median milliseconds of ``fn()`` after one warm-up call (all ranks start together when ``barrier``)."""
    result = fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        if barrier:
            dist.barrier()
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), result


def peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def attention_row(args, method, tokens, exchange, device, dtype, overrides) -> dict:
    """One patched attention call: the whole prompt on this GPU, then this rank's tokens with the exchange."""
    model = build_model(args.shape, 1, tokens, device, dtype)
    patchattn.patch(model, method, **overrides)
    module = model.model.layers[0].self_attn
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, cfg.num_attention_heads, tokens, head_dim, device=device, dtype=dtype, generator=gen)
    k = torch.randn(1, cfg.num_key_value_heads, tokens, head_dim, device=device, dtype=dtype, generator=gen)
    v = torch.randn(1, cfg.num_key_value_heads, tokens, head_dim, device=device, dtype=dtype, generator=gen)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    whole = ALL_ATTENTION_FUNCTIONS[cfg._attn_implementation]
    kwargs = dict(scaling=head_dim ** -0.5, dropout=0.0)
    with torch.no_grad():
        one_ms, reference = timed(lambda: whole(module, q, k, v, None, **kwargs)[0], device, args.repeats, False)
        cp = context_parallel(model, balance=args.balance, exchange=exchange)
        positions = cp.split(tokens).positions(cp.rank, device=device)
        ql, kl, vl = (t.index_select(2, positions) for t in (q, k, v))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ms, out = timed(lambda: cp.attention(module, ql, kl, vl, **kwargs), device, args.repeats, True)
        err = (out.float() - reference.index_select(1, positions).float()).abs().max().item()
    return dict(ms=ms, one_gpu_ms=one_ms, max_err=err, peak_gib=peak_gib(device))


def model_row(args, method, tokens, exchange, device, dtype, overrides) -> dict:
    """A forward of ``--layers`` decoder layers (per layer), one GPU against the context-parallel prefill."""
    model = build_model(args.shape, args.layers, tokens, device, dtype)
    patchattn.patch(model, method, **overrides)
    ids = torch.randint(3, model.config.vocab_size, (1, tokens), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
    with torch.no_grad():
        one_ms, _ = timed(lambda: model(ids, logits_to_keep=1, use_cache=False), device, args.repeats, False)
        cp = context_parallel(model, balance=args.balance, exchange=exchange)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ms, _ = timed(lambda: cp(ids, logits_to_keep=1, use_cache=False), device, args.repeats, True)
    return dict(ms=ms / args.layers, one_gpu_ms=one_ms / args.layers, max_err=float("nan"), peak_gib=peak_gib(device))


def measured_row(row: dict, measure, device, rank: int) -> dict:
    """``row`` updated with ``measure()``; a configuration that fails (out of memory) is a row with its error."""
    try:
        row.update(measure())
    except Exception as err:  # noqa: BLE001 - a failed configuration is a result row
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if rank == 0:
        print(json.dumps(row), flush=True)
    return row


def write_csv(path: str, meta: dict, columns: list[str], rows: list[dict]) -> None:
    """The rows under a first comment line stamping the environment and command."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        f.write("# " + json.dumps(meta) + "\n")
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/distributed/context_parallel.py: needs CUDA GPUs (or --device cpu --shape tiny)", file=sys.stderr)
        return 2
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    method_args = json.loads(args.method_args)
    meta = dict(environment(), world=world, command="torchrun bench/distributed/context_parallel.py " +
                " ".join(sys.argv[1:] if argv is None else argv))
    rows = []
    runners = {"attention": attention_row, "model": model_row}
    for mode in args.modes:
        for method in args.methods:
            overrides = {**method_args.get(method, {})}
            for tokens in args.tokens:
                for exchange in args.exchanges:
                    if exchange == "ring_attention" and method != "dense":
                        continue  # dense only (a content-based selection reads every key block first)
                    row = dict(mode=mode, method=method, tokens=tokens, layers=1 if mode == "attention" else args.layers,
                               world=world, exchange=exchange, balance=args.balance, error="")

                    def measure(mode=mode, method=method, tokens=tokens, exchange=exchange, overrides=overrides):
                        out = runners[mode](args, method, tokens, exchange, device, dtype, overrides)
                        return {**out, "speedup": out["one_gpu_ms"] / out["ms"]}

                    rows.append(measured_row(row, measure, device, rank))
    if rank == 0 and args.csv:
        write_csv(args.csv, meta, COLUMNS, rows)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
