"""Where a 128k prefill's time goes (4 Llama-3-8B-shaped layers): wall time per method, GPU kernel time by kernel."""
import os, sys, time, torch
from torch.profiler import profile, ProfilerActivity
import patchattn
from patchattn.bench.generate import llama3_8b_shaped
LAYERS, PROMPT = int(sys.argv[1]), int(sys.argv[2])
model = llama3_8b_shaped(LAYERS, PROMPT + 64)
ids = torch.randint(3, 120000, (1, PROMPT), device="cuda")
for spec in sys.argv[3].split(";"):
    name, _, kw = spec.partition("@")
    kwargs = eval(kw) if kw else {}
    ctx = patchattn.patched(model, name, **kwargs) if name != "sdpa" else torch.no_grad()
    with torch.no_grad(), ctx:
        fwd = lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1)
        fwd(); torch.cuda.synchronize()
        t = time.perf_counter(); fwd(); torch.cuda.synchronize(); wall = time.perf_counter() - t
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fwd(); torch.cuda.synchronize()
    gpu = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
    print(f"== {spec}: wall {wall*1000:.1f} ms, GPU kernels {gpu:.1f} ms ({LAYERS} layers, {PROMPT} tokens)")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=70))
