"""Tensor-parallel prefill of a patched model against one GPU (transformers' own TP, heads split across ranks).

    torchrun --nproc_per_node 2 bench/distributed/tensor_parallel.py \\
        --tokens 32768 131072 --methods dense hip blocktopk --csv bench/distributed/tensor_parallel.csv

A Llama-3-8B-shaped model with ``--layers`` decoder layers (random bf16 weights, written once to ``--folder``) is
loaded twice on every rank: whole on the rank's GPU (the one-GPU baseline), and with ``DistributedConfig(tp_size=
world)`` (q/k/v column-sharded, o_proj row-sharded: 32 / world query heads per rank), then patched with each method.
Per (method, prompt length): one prefill forward (``logits_to_keep=1``, no cache), median of ``--repeats`` after one
warm-up, ``ms`` per forward and per layer, ``speedup`` = one-GPU / TP time, ``max_err`` between the TP and the
one-GPU last-position logits, peak memory.  A configuration that fails (out of memory) writes its error and the next
one runs.  The CSV's first line stamps GPU, versions and commit (rank 0 writes).

On CPU (``--device cpu --shape tiny``, gloo) the same code runs at tiny sizes (tests/distributed/
test_tensor_parallel_bench.py); the times then mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from context_parallel import SHAPES, measured_row, peak_gib, timed, write_csv

import patchattn
from patchattn.report import environment

COLUMNS = ["method", "tokens", "layers", "world", "ms", "ms_per_layer", "one_gpu_ms", "speedup", "peak_gib",
           "one_gpu_peak_gib", "max_err", "error"]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--methods", nargs="+", default=["dense", "hip", "blocktopk"])
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the model")
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--method-args", default="{}", help='JSON per method, e.g. \'{"hip": {"dense_layers": []}}\'')
    p.add_argument("--folder", default=None, help="where the random model is written (default: a temporary folder)")
    p.add_argument("--csv", default=None)
    return p.parse_args(argv)


def write_model(args, folder: str, dtype) -> None:
    """Rank 0 writes the random model (same seed every run); the others wait for it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if dist.get_rank() == 0 and not os.path.exists(os.path.join(folder, "config.json")):
        config = LlamaConfig(**SHAPES[args.shape], num_hidden_layers=args.layers,
                             max_position_embeddings=max(max(args.tokens), 256))
        torch.manual_seed(0)
        LlamaForCausalLM(config).to(dtype).save_pretrained(folder)
    dist.barrier()


def load(folder: str, device, dtype, world: int | None):
    """The model whole on ``device`` (``world=None``), or sharded over the ranks by transformers' TP."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    if world is None:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype,
                                                distributed_config=DistributedConfig(tp_size=world)).eval()


def measure(model, method: str, overrides: dict, ids, device, repeats: int, barrier: bool):
    """(median ms of one prefill forward, last-position logits, peak GiB) of ``model`` patched with ``method``."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with patchattn.patched(model, method, **overrides), torch.no_grad():
        ms, out = timed(lambda: model(ids, logits_to_keep=1, use_cache=False).logits, device, repeats, barrier)
    return ms, out.float(), peak_gib(device)


def row_for(args, method, tokens, whole, sharded, device, overrides) -> dict:
    ids = torch.randint(3, whole.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    one_ms, want, one_peak = measure(whole, method, overrides, ids.to(device), device, args.repeats, False)
    ms, got, peak = measure(sharded, method, overrides, ids.to(sharded.device), device, args.repeats, True)
    return {"ms": ms, "ms_per_layer": ms / args.layers, "one_gpu_ms": one_ms, "speedup": one_ms / ms,
            "peak_gib": peak, "one_gpu_peak_gib": one_peak, "max_err": (got.cpu() - want.cpu()).abs().max().item()}


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/distributed/tensor_parallel.py: needs CUDA GPUs (or --device cpu --shape tiny)", file=sys.stderr)
        return 2
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))) if args.device == "cuda" else \
        torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    folder = args.folder or os.path.join(tempfile.gettempdir(), f"patchattn_tp_{args.shape}_{args.layers}")
    write_model(args, folder, dtype)
    whole, sharded = load(folder, device, dtype, None), load(folder, device, dtype, world)
    method_args = json.loads(args.method_args)
    meta = dict(environment(), world=world, command="torchrun bench/distributed/tensor_parallel.py " +
                " ".join(sys.argv[1:] if argv is None else argv))
    rows = []
    for method in args.methods:
        for tokens in args.tokens:
            row = {"method": method, "tokens": tokens, "layers": args.layers, "world": world, "error": ""}
            overrides = method_args.get(method, {})
            rows.append(measured_row(row, lambda m=method, t=tokens, o=overrides: row_for(args, m, t, whole, sharded,
                                                                                         device, o), device, rank))
    if rank == 0 and args.csv:
        write_csv(args.csv, meta, COLUMNS, rows)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
