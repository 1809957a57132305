"""``patchattn bench generate``: the real ``model.generate`` path, each method beside SDPA in one run (CUDA GPU).

What a user times: time to first token (one prefill forward), decode tokens per second, peak GPU memory, with the
default (dynamic) cache and with a static cache, on a Llama with Llama-3-8B's shape (32 layers, 32 query / 8 KV
heads of 128, hidden 4096) and random bf16 weights -- speed does not depend on the weights; quality is measured
elsewhere (bench/quality).  ``--layers`` shrinks the model for quick runs.  A configuration that fails (out of
memory, a compile error) is recorded as a row with its error, so one failure does not lose the run.

    patchattn bench generate --lengths 32768,131072 --batch 1 --methods dense,hip,blocktopk,streaming \
        --caches dynamic,static --csv generate.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time

import torch

from ..api import parse_methods, patch, unpatch
from ..report import environment, format_table

CACHES = ("dynamic", "static", "static-compiled")
COLUMNS = ["method", "cache", "batch", "prompt", "ttft_s", "decode_tok_s", "decode_ms_per_step", "peak_gib",
           "tokens_equal_dynamic", "error"]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="patchattn bench generate", description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="32768,131072", help="prompt lengths in tokens")
    p.add_argument("--batch", default="1", help="batch sizes (every row the same prompt length)")
    p.add_argument("--methods", default="dense,hip,blocktopk,streaming",
                   help="methods (dense = the model's SDPA), as for `patchattn eval`: 'a,b' or 'a;b@x:{...}'")
    p.add_argument("--caches", default="dynamic,static",
                   help=f"cache kinds among {', '.join(CACHES)} (static-compiled: transformers compiles the step)")
    p.add_argument("--new-tokens", type=int, default=32, help="decoded tokens per generate call")
    p.add_argument("--layers", type=int, default=32, help="decoder layers (32: Llama-3-8B)")
    p.add_argument("--csv", default=None, help="write the rows here (first line: the environment)")
    return p.parse_args(argv)


def llama3_8b_shaped(layers: int, max_len: int):
    """A Llama-3-8B-shaped model with random bf16 weights on the GPU (initialised there: seconds, not minutes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=max_len,
                         rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model.eval()


def _generate(model, ids, new_tokens: int, cache: str):
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
    if cache != "dynamic":
        kwargs["cache_implementation"] = "static"
        kwargs["disable_compile"] = cache == "static"
    return model.generate(input_ids=ids, **kwargs)


def _seconds(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def measure(model, ids, new_tokens: int, cache: str) -> tuple[dict, torch.Tensor]:
    """One warm generate (kernels compiled at this shape), then time to first token and the whole generate."""
    _generate(model, ids, 2, cache)
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        ttft, _ = _seconds(lambda: model(input_ids=ids, logits_to_keep=1))
        total, tokens = _seconds(lambda: _generate(model, ids, new_tokens, cache))
    steps = new_tokens - 1  # the first token comes from the prefill
    decode = max(total - ttft, 1e-9)
    row = {"ttft_s": ttft, "decode_tok_s": ids.shape[0] * steps / decode, "decode_ms_per_step": 1000 * decode / steps,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    return row, tokens[:, ids.shape[1]:]


def run(args) -> list[dict]:
    lengths = [int(x) for x in args.lengths.split(",")]
    batches = [int(x) for x in args.batch.split(",")]
    model = llama3_8b_shaped(args.layers, max(lengths) + args.new_tokens)
    rows, dynamic_tokens = [], {}
    for label, method, overrides in parse_methods(args.methods):
        handle = patch(model, method, **overrides) if method != "dense" else None
        try:
            for cache in args.caches.split(","):
                for length in lengths:
                    for batch in batches:
                        rows.append(_one(model, label, cache, batch, length, args.new_tokens, dynamic_tokens))
                        print(format_table([rows[-1]], COLUMNS), flush=True)
        finally:
            if handle is not None:
                unpatch(model)
    return rows


def _one(model, label, cache, batch, length, new_tokens, dynamic_tokens) -> dict:
    """One configuration's row; a static cache's tokens are compared with the same method's default-cache tokens."""
    gen = torch.Generator().manual_seed(length)
    ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=gen).cuda()
    row = {"method": label, "cache": cache, "batch": batch, "prompt": length}
    try:
        measured, tokens = measure(model, ids, new_tokens, cache)
    except (RuntimeError, AssertionError, ValueError) as err:  # OOM, compile errors: recorded, the run goes on
        torch.cuda.empty_cache()
        return {**row, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    key = (label, batch, length)
    if cache == "dynamic":
        dynamic_tokens[key] = tokens
    reference = dynamic_tokens.get(key) if cache != "dynamic" else None
    equal = None if reference is None else f"{int((tokens == reference).all(-1).sum())}/{batch}"
    torch.cuda.empty_cache()
    return {**row, **measured, "tokens_equal_dynamic": equal}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("patchattn bench generate needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = run(args)
    print(format_table(rows, COLUMNS))
    if args.csv:
        with open(args.csv, "w", newline="", encoding="utf-8") as handle:
            handle.write("# " + json.dumps({**environment(), "command": " ".join(sys.argv)}) + "\n")
            writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
