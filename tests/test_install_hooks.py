"""A method's ``install`` hook (``MethodSpec.install``): called once per patch with the patched model and the patch
record, its handles removed by ``unpatch``; a hook that raises leaves the model unpatched and unchanged."""

from dataclasses import dataclass

import pytest
import torch

import patchattn
from patchattn.kernels.dense import sdpa_attention
from patchattn.testing import tiny_inputs, tiny_model

SEEN = []


@dataclass(kw_only=True)
class HookedConfig(patchattn.MethodConfig):
    """Test-only: dense attention plus a whole-model forward hook."""

    fail: bool = False


def _install(model, patch):
    if patch.context is None or not patch.modules:
        raise AssertionError("install must see the patch record with its modules")
    if getattr(model, "patchattn_test_fail", False):
        raise RuntimeError("refused")
    SEEN.append(("install", type(model).__name__, len(patch.modules)))
    return [model.register_forward_hook(lambda *_: SEEN.append(("forward",)))]


@patchattn.register_method("test_hooked", config=HookedConfig, category="other", paper="test", install=_install)
def hooked_attention(module, query, key, value, attention_mask, **kwargs):
    """Dense attention; the method's work is its install hook."""
    return sdpa_attention(module, query, key, value, attention_mask, **kwargs)


def test_install_runs_once_and_unpatch_removes_its_handles():
    SEEN.clear()
    model = tiny_model("llama").eval()
    inputs = tiny_inputs(model, "llama")
    with torch.no_grad():
        before = model(**inputs).logits
    handle = patchattn.patch(model, "test_hooked")
    assert SEEN == [("install", type(model).__name__, len(handle.modules))]
    with torch.no_grad():
        model(**inputs)
    assert SEEN[-1] == ("forward",)
    patchattn.unpatch(model)
    SEEN.clear()
    with torch.no_grad():
        after = model(**inputs).logits
    assert SEEN == [] and torch.equal(before, after)


def test_a_failing_install_leaves_the_model_unpatched():
    model = tiny_model("llama").eval()
    model.patchattn_test_fail = True
    with pytest.raises(RuntimeError, match="refused"):
        patchattn.patch(model, "test_hooked")
    assert patchattn.get_handle(model) is None
    assert all(getattr(m, "patchattn", None) is None for m in model.modules())
    assert not model._forward_hooks
