"""Batched ``generate`` with left padding, what a user times: each sparse method vs SDPA, padded vs same-length batch.

A padded batch runs one kernel call per group of rows with the same real span (methods/_rows.py); this measures
what that costs in a whole model's prefill and decode.  The model is a Llama with SmolLM2-135M's shape (30 layers,
9 query / 3 KV heads of 64) and random bf16 weights: timing does not depend on the weights, quality is tested on CPU
(tests/methods/test_padding.py).  Each padded row's greedy tokens are also compared with the row generated alone.

    python bench/padding/padded_generate.py OUT.json [--lengths 32768,24576,16384,8192] [--new 32]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import patchattn  # noqa: E402
from patchattn.report import environment  # noqa: E402

METHODS = ["dense", "streaming", "blocktopk", "hip", "moa", "s2"]


def model_like_smollm2(max_len: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=max_len,
                         rope_theta=100000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()


def left_padded(lengths: list[int], vocab: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    rows = [torch.randint(3, vocab, (n,), generator=gen) for n in lengths]
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    return rows, ids.cuda(), mask.cuda()


def timed(fn, repeats: int = 2) -> tuple[float, object]:
    fn()  # warm-up (compilation, autotuning)
    torch.cuda.synchronize()
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out


def generate(model, ids, mask, new: int):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, pad_token_id=0)


def measure(model, method: str, lengths: list[int], new: int) -> list[dict]:
    rows, ids, mask = left_padded(lengths, model.config.vocab_size)
    same = torch.full_like(ids, 0)
    same[:] = ids[:1]  # the same-length batch: every row is the longest one, nothing padded
    results = []
    handle = patchattn.patch(model, method) if method != "dense" else None
    try:
        with torch.no_grad():
            for layout, batch_ids, batch_mask in (("same length", same, None), ("left padded", ids, mask)):
                prefill, _ = timed(lambda: model(input_ids=batch_ids, attention_mask=batch_mask, use_cache=False,
                                                   logits_to_keep=1))
                total, tokens = timed(lambda: generate(model, batch_ids, batch_mask, new))
                results.append({"method": method, "layout": layout, "prefill_s": prefill, "generate_s": total,
                                "decode_ms_per_token": 1000 * max(total - prefill, 0.0) / new})
            matches = 0
            for i, row in enumerate(rows):
                alone = generate(model, row[None].cuda(), None, new)[0, len(row):]
                matches += int(torch.equal(alone, tokens[i, ids.shape[1]:]))
            results[-1]["rows_equal_alone"] = f"{matches}/{len(rows)}"
    finally:
        if handle is not None:
            patchattn.unpatch(model)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--lengths", default="32768,24576,16384,8192")
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    model = model_like_smollm2(max(lengths) + args.new)
    rows = []
    for method in args.methods.split(","):
        rows += measure(model, method, lengths, args.new)
        print(json.dumps(rows[-2:]), flush=True)
    meta = {"environment": environment(), "command": " ".join(sys.argv), "lengths": lengths, "new_tokens": args.new,
            "model": "Llama, SmolLM2-135M shape, random bf16 weights"}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
