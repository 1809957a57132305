"""Count the Python function calls patchattn makes per layer on the CPU (tests; design notes 56, 57).

Eager decode steps and short prefills are host-bound on a GPU: what a layer costs there is the host's time to run
the layer's Python and queue its kernels.  A CPU run cannot time that the way a GPU would, but it can count it:
``PythonCalls(entry)`` counts the Python ``call`` events (``sys.setprofile``) made inside ``entry`` -- the
attention function the model calls in every layer -- and under it, except inside a kernel's own code (its
pure-torch reference or Triton's interpreter: a GPU runs one launch there).  Calls into torch's or transformers'
Python count too: they are host time the method chose to spend.  C functions (``c_call``) are counted apart.

``calls_per_layer`` builds the same tiny model with 2 and 4 layers and halves the difference, so the work done
once per forward (the first layer's per-forward memos, the root model's hooks) drops out.
"""

from __future__ import annotations

import collections
import contextlib
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForImageTextToText, DynamicCache

import patchattn
from patchattn.models import TINY_CONFIGS, tiny_model
from patchattn.testing import tiny_inputs

# The patched attention function every layer calls (``adapters/hf.py``), and the unpatched model's SDPA function.
PATCHED_ENTRY = ("patchattn/adapters/hf.py", "attention")
SDPA_ENTRY = ("transformers/integrations/sdpa_attention.py", "sdpa_attention_forward")
KERNEL_CODE = ("/kernels/blocksparse/reference.py", "/kernels/blockselect/reference.py",
               "/kernels/colclass/reference.py", "/triton/")


def _is(code, where: tuple[str, str]) -> bool:
    return code.co_name == where[1] and code.co_filename.endswith(where[0])


class PythonCalls:
    """``with PythonCalls() as c: model(...)``; ``c.calls``: Python calls under the entry, ``c.c_calls``: C
    calls there, ``c.sites``: a Counter of ``(file, function)`` for the Python calls."""

    def __init__(self, entry: tuple[str, str] = PATCHED_ENTRY):
        self.entry = entry
        self.calls = 0
        self.c_calls = 0
        self.sites: collections.Counter = collections.Counter()

    def _counted(self, frame) -> bool:
        """Whether ``frame`` runs under the entry and outside kernel code (and outside ``EntryOps``)."""
        while frame is not None:
            code = frame.f_code
            if code.co_filename == __file__ or any(part in code.co_filename for part in KERNEL_CODE):
                return False
            if _is(code, self.entry):
                return True
            frame = frame.f_back
        return False

    def _profile(self, frame, event, _arg):
        if event == "call" and self._counted(frame):
            self.calls += 1
            self.sites[frame.f_code.co_filename.rsplit("site-packages/", 1)[-1], frame.f_code.co_name] += 1
        elif event == "c_call" and self._counted(frame):
            self.c_calls += 1

    def __enter__(self):
        self._previous = sys.getprofile()
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc):
        sys.setprofile(self._previous)
        return False


class EntryOps(TorchDispatchMode):
    """The aten ops issued under the entry, outside kernel code (each one a kernel launch or a view on a GPU)."""

    def __init__(self, entry: tuple[str, str] = PATCHED_ENTRY):
        super().__init__()
        self.entry = entry
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        frame = sys._getframe(1)
        while frame is not None:
            code = frame.f_code
            if any(part in code.co_filename for part in KERNEL_CODE):
                break
            if _is(code, self.entry):
                self.ops += 1
                break
            frame = frame.f_back
        return func(*args, **(kwargs or {}))


def tiny_llama(layers: int):
    model = tiny_model("llama")
    if layers != model.config.num_hidden_layers:
        config = model.config
        config.num_hidden_layers = layers
        torch.manual_seed(0)
        model = type(model)(config).eval()
    return model


def tiny_llava(layers: int):
    config = TINY_CONFIGS["llava"]()
    config.get_text_config().num_hidden_layers = layers
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(config).eval()


@dataclass
class Step:
    """One counted forward: Python calls and C calls under the entry, where the Python calls were, and the aten ops
    there (these in a forward of their own, with no profile on)."""

    calls: int
    c_calls: int
    sites: collections.Counter
    ops: int = 0


def _counted(forward: Callable, entry, ops: bool) -> Step:
    if ops:
        with EntryOps(entry) as counter:
            forward()
        return Step(0, 0, collections.Counter(), counter.ops)
    with PythonCalls(entry) as counter:
        forward()
    return Step(counter.calls, counter.c_calls, counter.sites)


@contextlib.contextmanager
def _patched(model, method: str | None, options: dict):
    """The model patched with ``method`` (None: unpatched) under no_grad, warnings quiet, unpatched on exit."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        patch = None if method is None else patchattn.patch(model, method, **options)
        try:
            yield
        finally:
            if patch is not None:
                patchattn.unpatch(model)


def decode_step(model, method: str | None, options: dict, *, prompt: int = 256, warm: int = 3,
                ops: bool = False) -> Step:
    """One default-cache decode step after a ``prompt``-token prefill and ``warm`` steps (``method`` None: the
    unpatched model, counted under transformers' SDPA function; ``ops``: count aten ops, not calls)."""
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt))
    entry = SDPA_ENTRY if method is None else PATCHED_ENTRY
    with _patched(model, method, options):
        cache = DynamicCache()
        token = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        for _ in range(warm):
            model(input_ids=token, past_key_values=cache, use_cache=True)
        return _counted(lambda: model(input_ids=token, past_key_values=cache, use_cache=True), entry, ops)


def prefill(model, method: str | None, options: dict, *, prompt: int = 64, warm: int = 1, ops: bool = False) -> Step:
    """One prefill of ``prompt`` tokens (no cache) after ``warm`` identical ones."""
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt))
    entry = SDPA_ENTRY if method is None else PATCHED_ENTRY
    with _patched(model, method, options):
        for _ in range(warm):
            model(input_ids=ids, use_cache=False)
        return _counted(lambda: model(input_ids=ids, use_cache=False), entry, ops)


def lvlm_prefill(model, method: str | None, options: dict, *, text_len: int = 40, warm: int = 1,
                 ops: bool = False) -> Step:
    """One tiny-LLaVA prefill (an image and ``text_len`` text tokens, batch 2) after ``warm`` identical ones."""
    torch.manual_seed(0)
    inputs = tiny_inputs(model, "llava", batch=2, text_len=text_len)
    entry = SDPA_ENTRY if method is None else PATCHED_ENTRY
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        patch = None if method is None else patchattn.patch(model, method, **options)
        try:
            for _ in range(warm):
                model(**inputs)
            return _counted(lambda: model(**inputs), entry, ops)
        finally:
            if patch is not None:
                patchattn.unpatch(model)


def calls_per_layer(run: Callable, method: str | None, options: dict, **kwargs) -> tuple[float, float, dict]:
    """(Python calls, C calls, sites) per layer of ``run`` (``decode_step``, ``prefill``: a tiny Llama;
    ``lvlm_prefill``: a tiny LLaVA's text layers): 4 layers minus 2, halved; sites are the per-layer difference."""
    build = tiny_llava if run is lvlm_prefill else tiny_llama
    two = run(build(2), method, options, **kwargs)
    four = run(build(4), method, options, **kwargs)
    sites = {k: (four.sites[k] - two.sites[k]) / 2 for k in four.sites | two.sites if four.sites[k] != two.sites[k]}
    return (four.calls - two.calls) / 2, (four.c_calls - two.c_calls) / 2, sites


def ops_per_layer(run: Callable, method: str | None, options: dict, **kwargs) -> float:
    """Aten ops per layer under the entry (kernel code excluded), as ``calls_per_layer``."""
    build = tiny_llava if run is lvlm_prefill else tiny_llama
    two = run(build(2), method, options, ops=True, **kwargs)
    four = run(build(4), method, options, ops=True, **kwargs)
    return (four.ops - two.ops) / 2


# Options that make every method sparse on a 256-token prompt at block 16 (as bench/generate/decode_host_work.py).
DECODE_METHODS = {
    "dense": {},
    "streaming": {"window": 16, "sink_tokens": 16, "block_size": 16, "backend": "torch"},
    "hip": {"block_size": 16, "top_k": 2, "dense_layers": [], "backend": "torch"},
    "duo": {"window": 16, "sink_tokens": 16, "block_size": 16, "retrieval_fraction": 0.5, "backend": "torch"},
    "blocktopk": {"block_size": 16, "top_k": 2, "backend": "torch"},
}
# LVLM methods with every text layer active (as tests/methods/test_lvlm_syncs.py).
LVLM_METHODS = {"dense": {}, "vhr": {"last_layers": 100}, "paint": {"start_layer": 0}}


def main() -> int:
    """Print the table of design note 57 (``PYTHONPATH=$PWD python tests/python_calls.py [--sites]``)."""
    sites = "--sites" in sys.argv
    print("| path | method | Python calls / layer | C calls / layer | aten ops / layer |")
    rows = [("decode", m, o, decode_step) for m, o in DECODE_METHODS.items()]
    rows += [("prefill", m, o, prefill) for m, o in DECODE_METHODS.items()]
    rows = [("decode", None, {}, decode_step), ("prefill", None, {}, prefill), *rows]
    rows += [("LLaVA prefill", None, {}, lvlm_prefill)]
    rows += [("LLaVA prefill", m, o, lvlm_prefill) for m, o in LVLM_METHODS.items()]
    for path, method, options, run in rows:
        calls, c_calls, where = calls_per_layer(run, method, options)
        ops = ops_per_layer(run, method, options)
        print(f"| {path} | {method or 'unpatched (SDPA)'} | {calls:g} | {c_calls:g} | {ops:g} |", flush=True)
        if sites:
            for (file, name), n in sorted(where.items(), key=lambda kv: -kv[1]):
                print(f"    {n:g}  {file}:{name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
