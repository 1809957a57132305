"""``moh`` on DiTs: heads routed per token in self/joint attention, cross-attention dense; the dense-equivalent
setting is exact on every tiny DiT; the routed output equals SDPA times the gates computed by hand."""

import pytest
import torch

pytest.importorskip("diffusers")

import patchattn
from patchattn.methods.moh import norm_logits

from dit_cases import FAMILIES, run, tiny


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_equivalent_is_exact_and_unpatch_restores(family):
    model, inputs = tiny(family)
    reference = run(model, inputs)
    patchattn.patch(model, "moh", active_ratio=1.0)
    assert torch.equal(run(model, inputs), reference)
    patchattn.patch(model, "moh", active_ratio=0.5, shared_heads=1)
    assert not torch.allclose(run(model, inputs), reference)  # half the heads routed away changes the output
    patchattn.unpatch(model)
    assert torch.equal(run(model, inputs), reference)


class _Module(torch.nn.Module):
    heads, inner_dim = 4, 64


def _state_module(backend="torch", **overrides):
    from patchattn.methods.moh import make_moh_state
    from patchattn.state import PatchContext

    module = _Module()
    config = patchattn.get_config("moh", backend=backend, **overrides)
    module.add_module("patchattn", make_moh_state(module, config, 0, "dit", PatchContext(kind="dit")))
    return module


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_routed_output_is_sdpa_times_the_gates(backend, monkeypatch):
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 70, 16) for _ in "qkv")  # 70 tokens: not a multiple of the kernel tile
    module = _state_module(backend, shared_heads=1, top_k=1)
    from patchattn.registry import get_spec

    out, _ = get_spec("moh").forward(module, q, k, v, None, scaling=None, dropout=0.0, is_causal=False,
                                     cross_attention=False, enable_gqa=False)
    routed = torch.tensor([1, 2, 3])
    chosen = routed[norm_logits(q, routed).argmax(-1)]  # [B, T]: the one routed head each token keeps
    gates = torch.zeros(2, 70, 4)
    gates[..., 0] = 1
    gates.scatter_(-1, chosen[..., None], 1.0)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2) * gates[..., None]
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    assert module.patchattn.stats["density"] == pytest.approx(0.5)


def test_cross_attention_stays_dense():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 12, 16), torch.randn(1, 4, 5, 16), torch.randn(1, 4, 5, 16)
    from patchattn.registry import get_spec

    out, _ = get_spec("moh").forward(_state_module(shared_heads=1, top_k=1), q, k, v, None, scaling=None,
                                     dropout=0.0, is_causal=False, cross_attention=True, enable_gqa=False)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2))
