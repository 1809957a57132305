"""Python calls per layer on the hot paths (design note 57): eager decode steps and short prefills are host-bound on
a GPU, so each layer's Python is time the device waits for.

Counted by ``tests/python_calls.py`` on a tiny random Llama (2 vs 4 layers, halved), under the patched attention
entry, kernel references excluded.  Before note 57 (commit a9b9ed2): decode streaming 69, hip 48, duo 73, blocktopk
55, dense 21 (the unpatched model's SDPA function: 7); dense prefill 31; the NaN/Inf check issued 31 aten ops per
prefill layer.  The ceilings below are note 57's counts plus a little slack, so each test fails on the old code.
"""

import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from patchattn import checks

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from python_calls import DECODE_METHODS, calls_per_layer, decode_step, prefill

# Note 57's counts: streaming 43, hip 31, duo 47, blocktopk 39 (absolute: no transformers code runs on their path).
DECODE_CEILINGS = {"streaming": 46, "hip": 34, "duo": 50, "blocktopk": 42}


def _top(sites: dict) -> list:
    """The functions called most per layer, for the failure message."""
    return sorted(((n, f"{path.rsplit('/', 1)[-1]}:{name}") for (path, name), n in sites.items()), reverse=True)[:15]


@pytest.mark.parametrize("method", sorted(DECODE_CEILINGS))
def test_sparse_decode_step_python_calls_per_layer(method):
    calls, _, sites = calls_per_layer(decode_step, method, DECODE_METHODS[method])
    assert calls <= DECODE_CEILINGS[method], f"{method}: {calls} Python calls per decode layer; where: {_top(sites)}"


@pytest.mark.parametrize("run,ceiling", [(decode_step, 10), (prefill, 15)], ids=["decode", "prefill"])
def test_dense_python_calls_per_layer_over_the_unpatched_model(run, ceiling):
    """``dense`` against the unpatched model's own SDPA function (transformers' calls cancel out): note 57 counts 8
    more per decode layer (was 14) and 13 more per prefill layer (was 24)."""
    dense, _, sites = calls_per_layer(run, "dense", {})
    unpatched, _, _ = calls_per_layer(run, None, {})
    assert dense - unpatched <= ceiling, f"dense: {dense} vs unpatched {unpatched}; where: {_top(sites)}"


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_the_input_check_issues_few_ops_per_layer():
    """One ``aminmax`` per tensor, then 3 small ops (and a view) for all three: 8 aten ops (was 31: ``isfinite`` is
    4 ops, twice per tensor, and an ``&``)."""
    q = torch.randn(1, 8, 4, 16).transpose(1, 2)  # a strided view, as transformers hands the query
    kv = torch.randn(1, 2, 8, 16)
    with _Ops() as counter:
        checks.finite_flags((q, kv, kv))
    assert counter.ops.count("aminmax") == 3
    assert len(counter.ops) <= 8, counter.ops
