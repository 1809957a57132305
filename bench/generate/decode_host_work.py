"""Host work patchattn adds per layer to one default-cache decode step (issue 20), measured on the CPU.

Tiny Llama built with 2 and 4 layers, a 256-token prompt (every method sparse at block 16), 3 decode steps to warm,
then one step counted: (a) aten ops issued inside the patched attention entry (``adapters/hf.py`` ``attention``)
but not inside a kernel's pure-torch reference (``kernels/blocksparse/reference.py``, ``kernels/blockselect/
reference.py``: a GPU runs one Triton launch instead) and (b) Python calls in ``patchattn/`` code (cProfile, kernel
references excluded).  Per layer = (4 layers - 2 layers) / 2, so once-per-forward work is not in it.
Run: ``PYTHONPATH=$PWD python bench/generate/decode_host_work.py`` (about a minute on 2 CPU cores).
"""
import collections, sys, warnings, cProfile, pstats, json
import torch
from torch.utils._python_dispatch import TorchDispatchMode
import patchattn
from patchattn.models import tiny_model

KERNEL = ("/kernels/blocksparse/reference.py", "/kernels/blockselect/reference.py", "/triton/")
ROOT = "/patchattn/"

class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__(); self.n = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        f = sys._getframe(1); counted = False
        while f is not None:
            p = f.f_code.co_filename
            if any(k in p for k in KERNEL): break
            if ROOT in p and "/_python_dispatch" not in p and "patchattn/adapters/hf.py" in p and f.f_code.co_name == "attention":
                counted = True; break
            f = f.f_back
        if counted: self.n += 1
        return func(*args, **(kwargs or {}))

def calls_in(prof):
    st = pstats.Stats(prof); n = 0
    for (path, line, name), (cc, nc, tt, ct, callers) in st.stats.items():
        if ROOT in path and not any(k in path for k in KERNEL): n += nc
    return n

METHODS = {
    "dense": {},
    "streaming": dict(window=16, sink_tokens=16, block_size=16),
    "hip": dict(block_size=16, top_k=2, dense_layers=[]),
    "blocktopk": dict(block_size=16, top_k=2),
    "duo": dict(window=16, sink_tokens=16, block_size=16, retrieval_fraction=0.5),
}

def step(model, layers, method, opts):
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, 256))
    from transformers import DynamicCache
    with warnings.catch_warnings(), torch.no_grad(), patchattn.patched(model, method, backend="torch", **opts):
        warnings.simplefilter("ignore")
        cache = DynamicCache()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(3):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        with Ops() as c:
            model(input_ids=nxt, past_key_values=cache, use_cache=True)
        # fresh cache position issue: repeat another step for cProfile
        pr = cProfile.Profile(); pr.enable()
        model(input_ids=nxt, past_key_values=cache, use_cache=True)
        pr.disable()
    return c.n, calls_in(pr)

if __name__ == "__main__":
    res = {}
    for method, opts in METHODS.items():
        try:
            r = {}
            for L in (2, 4):
                from patchattn.models import TINY_CONFIGS
                from transformers import AutoModelForCausalLM
                cfg = TINY_CONFIGS["llama"](); cfg.num_hidden_layers = L
                torch.manual_seed(0); m = AutoModelForCausalLM.from_config(cfg).eval()
                r[L] = step(m, L, method, opts)
            res[method] = r
            print(method, r, "per layer ops %.1f calls %.1f" % ((r[4][0]-r[2][0])/2, (r[4][1]-r[2][1])/2), flush=True)
        except Exception as e:
            print(method, "ERR", type(e).__name__, str(e)[:300], flush=True)
