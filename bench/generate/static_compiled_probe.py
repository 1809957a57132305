"""GPU probe: static-cache decode compiled by transformers (reduce-overhead CUDA graphs, with and without fullgraph)
vs the default cache eager, batch 1 and a left-padded batch 2, on Llama-3-8B-shaped layers with random weights.

    python bench/generate/static_compiled_probe.py LAYERS PROMPT dense,streaming,duo,s2   (writes $OUT/probe.json)
"""
import json, sys, time, gc, traceback
import torch
from transformers import CompileConfig
import patchattn
from patchattn.bench.generate import llama3_8b_shaped

LAYERS, PROMPT = int(sys.argv[1]), int(sys.argv[2])
methods = sys.argv[3].split(",")
model = llama3_8b_shaped(LAYERS, PROMPT + 256)
rows = []

def timed(fn):
    torch.cuda.synchronize(); t = time.perf_counter(); out = fn(); torch.cuda.synchronize()
    return out, time.perf_counter() - t

for batch in (1, 2):
    ids = torch.randint(3, 120000, (batch, PROMPT), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    mask = torch.ones_like(ids)
    if batch == 2:
        mask[1, :1000] = 0
    for method in methods:
        for cache in ("dynamic", "static-compiled", "static-compiled-fullgraph"):
            torch._dynamo.reset(); gc.collect(); torch.cuda.empty_cache()
            row = {"method": method, "batch": batch, "cache": cache}
            try:
                ctx = patchattn.patched(model, method) if method != "sdpa" else torch.no_grad()
                with torch.no_grad(), ctx:
                    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0)
                    if cache != "dynamic":
                        cc = CompileConfig(fullgraph=cache.endswith("fullgraph"))
                        kw.update(cache_implementation="static", compile_config=cc)
                    def gen(n):
                        return model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, **kw)
                    gen(4); gen(36); gen(4)  # warm-up (compile each cache size)
                    a, ta = timed(lambda: gen(4))
                    b, tb = timed(lambda: gen(36))
                    row.update(ms_per_step=1000 * (tb - ta) / 32, ttft_s=ta, tokens=b[:, PROMPT:].tolist())
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                traceback.print_exc(limit=3)
            print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
            rows.append(row)
for r in rows:
    base = next((x for x in rows if x["method"] == r["method"] and x["batch"] == r["batch"] and x["cache"] == "dynamic"), None)
    if base and "tokens" in r and "tokens" in base:
        r["equal_dynamic"] = r["tokens"] == base["tokens"]
import os
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "probe.json"), "w"), indent=1)
for r in rows:
    print(r["method"], r["batch"], r["cache"], round(r.get("ms_per_step", -1), 2), r.get("equal_dynamic"), r.get("error", "")[:150])
