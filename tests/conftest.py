import collections
import os
from dataclasses import dataclass

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


@pytest.fixture
def triton_interpreter(monkeypatch):
    """Run Triton kernels on the CPU through the interpreter (the GPU tests use the real device)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
