"""Host work patchattn adds per layer to one default-cache decode step (issue 20; design note 56), on the CPU.

A tiny Llama built with 2 and 4 layers, a 256-token prompt (every method sparse at block 16), 3 decode steps to
warm, then one step counted: (a) aten ops issued inside the patched attention entry (``adapters/hf.py``
``attention``) but not inside a kernel's pure-torch reference (``kernels/blocksparse/reference.py``,
``kernels/blockselect/reference.py``: a GPU runs one Triton launch instead) and (b) Python calls in ``patchattn/``
code (cProfile, kernel references excluded).  Per layer = (4 layers - 2 layers) / 2, so once-per-forward work drops
out.  About a minute on 2 CPU cores:

    PYTHONPATH=$PWD python bench/generate/decode_host_work.py
"""
from __future__ import annotations

import cProfile
import pstats
import sys
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, DynamicCache

import patchattn
from patchattn.models import TINY_CONFIGS

KERNEL_REFERENCES = ("/kernels/blocksparse/reference.py", "/kernels/blockselect/reference.py", "/triton/")
PACKAGE = "/patchattn/"
ENTRY = ("patchattn/adapters/hf.py", "attention")  # the patched attention function every layer calls
METHODS = {
    "dense": {},
    "streaming": {"window": 16, "sink_tokens": 16, "block_size": 16},
    "hip": {"block_size": 16, "top_k": 2, "dense_layers": []},
    "blocktopk": {"block_size": 16, "top_k": 2},
    "duo": {"window": 16, "sink_tokens": 16, "block_size": 16, "retrieval_fraction": 0.5},
}


class EntryOps(TorchDispatchMode):
    """Counts the aten ops issued under the patched attention entry, outside the kernels' torch references."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        frame = sys._getframe(1)
        while frame is not None:
            path = frame.f_code.co_filename
            if any(k in path for k in KERNEL_REFERENCES):
                break
            if path.endswith(ENTRY[0]) and frame.f_code.co_name == ENTRY[1]:
                self.count += 1
                break
            frame = frame.f_back
        return func(*args, **(kwargs or {}))


def package_calls(profile: cProfile.Profile) -> int:
    """Python calls made in patchattn's code (kernel references excluded)."""
    stats = pstats.Stats(profile).stats
    return sum(calls for (path, _line, _name), (_cc, calls, *_rest) in stats.items()
               if PACKAGE in path and not any(k in path for k in KERNEL_REFERENCES))


def tiny_llama(layers: int):
    config = TINY_CONFIGS["llama"]()
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def one_step(model, method: str, options: dict) -> tuple[int, int]:
    """(aten ops, Python calls) of one decode step after a 256-token prefill and 3 warm-up steps."""
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, 256))
    with warnings.catch_warnings(), torch.no_grad(), patchattn.patched(model, method, backend="torch", **options):
        warnings.simplefilter("ignore")
        cache = DynamicCache()
        token = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        for _ in range(3):
            model(input_ids=token, past_key_values=cache, use_cache=True)
        with EntryOps() as ops:
            model(input_ids=token, past_key_values=cache, use_cache=True)
        profile = cProfile.Profile()
        profile.enable()
        model(input_ids=token, past_key_values=cache, use_cache=True)
        profile.disable()
    return ops.count, package_calls(profile)


def main() -> int:
    print("method, aten ops per layer, Python calls per layer")
    for method, options in METHODS.items():
        two, four = (one_step(tiny_llama(layers), method, options) for layers in (2, 4))
        print(f"{method}, {(four[0] - two[0]) / 2:.1f}, {(four[1] - two[1]) / 2:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
