import collections
import functools
import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import patchattn
from patchattn.kernels.dense import eager_attention, sdpa_attention

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass(kw_only=True)
class ProbeConfig(patchattn.MethodConfig):
    """Test-only method: dense attention that records each call."""


PROBE_CALLS: collections.Counter = collections.Counter()


@patchattn.register_method("test_probe", config=ProbeConfig, category="other", paper="test probe")
def probe_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, **kwargs):
    """Dense attention that counts its calls by role."""
    PROBE_CALLS[module.patchattn.role] += 1
    PROBE_CALLS["query_len", query.shape[2]] += 1
    if kwargs.get("softcap") is not None:
        return eager_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    return sdpa_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


@pytest.fixture
def probe_calls():
    PROBE_CALLS.clear()
    return PROBE_CALLS


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@functools.cache
def interpreter_runs_scalar_loops() -> bool:
    """Whether this Triton's interpreter can loop up to a scalar loaded in the kernel, as every kernel here does.

    Triton 3.6's interpreter holds a loaded scalar as a 1-element array and converts loop bounds with ``int()``,
    which numpy 2.x refuses for arrays of rank 1 (checked with numpy 2.4: "only 0-dimensional arrays can be
    converted to Python scalars"); Triton 3.9's does not. Compiled kernels are not affected."""
    import triton
    import triton.language as tl

    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        @triton.jit
        def count_steps(bound_ptr, out_ptr):
            steps = tl.load(bound_ptr) * 0
            for _ in range(0, tl.load(bound_ptr), 2):
                steps += 1
            tl.store(out_ptr, steps)

        out = torch.zeros(1, dtype=torch.int32)
        try:
            count_steps[(1,)](torch.tensor([5], dtype=torch.int32), out)
        except Exception:  # noqa: BLE001 - any failure means the interpreter cannot run our kernels
            return False
        return out.item() == 3
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


@pytest.fixture
def triton_interpreter(monkeypatch):
    """Run Triton kernels on the CPU through the interpreter (the GPU tests use the real device)."""
    triton = pytest.importorskip("triton")
    if not interpreter_runs_scalar_loops():
        pytest.skip(f"the Triton {triton.__version__} interpreter cannot loop to a loaded scalar with numpy "
                    f"{np.__version__} (see interpreter_runs_scalar_loops); compiled kernels are tested on the GPU")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def triton_target(request):
    """Where a Triton-path test runs: "cuda" (compiled) on a GPU machine, else "cpu" through the interpreter."""
    if torch.cuda.is_available():
        pytest.importorskip("triton")
        return "cuda"
    request.getfixturevalue("triton_interpreter")
    return "cpu"
