"""moh: head plan, the query-norm router, dense equivalence, kernel path vs the torch path (forward, gradients,
GQA, padding), cache consistency of per-token and per-block routing, and the learned router's parameters + loss."""

import types

import pytest
import torch
from decode_cases import decoded_rows

import patchattn
from patchattn.methods import moh
from patchattn.state import PatchContext, PatchState
from patchattn.testing import left_pad, max_abs_diff, tiny_model


def _config(**overrides):
    return patchattn.get_config("moh", **overrides)


def test_head_plan_follows_the_paper_and_refuses_impossible_settings():
    assert moh.head_plan(_config(), 32) == (list(range(16)), list(range(16, 32)), 8)  # MoH-LLaMA3-8B: 75%
    shared, routed, k = moh.head_plan(_config(), 9)  # SmolLM2
    assert (len(shared), len(routed), k) == (4, 5, 3)
    assert moh.head_plan(_config(shared_heads=[1, 3], top_k=1), 4) == ([1, 3], [0, 2], 1)
    with pytest.raises(ValueError, match=r"must be in \[0, 2\]"):
        moh.head_plan(_config(shared_heads=2, top_k=3), 4)
    with pytest.raises(ValueError, match=r"heads are ints in \[0, 3\]"):
        moh.head_plan(_config(shared_heads=[5]), 4)
    with pytest.raises(ValueError, match="must be one of"):
        _config(router="random")


def _state(model, layer=0, **overrides):
    module = model.model.layers[layer].self_attn
    return moh.make_moh_state(module, _config(**overrides), layer, "text", PatchContext())


def test_norm_router_activates_shared_plus_top_k_by_query_norm():
    model = tiny_model("llama")  # 4 heads: 2 shared, 2 routed
    state = _state(model, shared_heads=1, top_k=2, active_ratio=0.5)  # 3 routed, 2 active
    query, value = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 9, 16)
    gates, active = moh.route(state, query, value, None, None)
    assert torch.equal(active.sum(-1), torch.full((2, 9), 3))
    assert active[..., 0].all()
    norms = query[:, 1:].norm(dim=-1).transpose(1, 2)  # [B, T, 3]
    expected = torch.zeros_like(norms, dtype=torch.bool).scatter(-1, norms.topk(2, dim=-1).indices, True)
    assert torch.equal(active[..., 1:], expected)
    assert torch.equal(gates, active.float())  # binary gates


def test_all_heads_active_is_exactly_dense():
    model = tiny_model("llama")
    inputs = left_pad({"input_ids": torch.randint(3, 100, (2, 30))}, [0, 5])
    with torch.no_grad():
        reference = model(**inputs).logits
        with patchattn.patched(model, "moh", **moh.MoHConfig.DENSE_EQUIVALENT):
            assert torch.equal(model(**inputs).logits, reference)
        with patchattn.patched(model, "moh"):
            assert max_abs_diff(model(**inputs).logits, reference) > 1e-3
            assert model.model.layers[0].self_attn.patchattn.stats["density"] == pytest.approx(0.75)


def _attention_inputs(dtype, batch=2, heads=4, kv_heads=2, length=40, dim=16):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(batch, heads, length, dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, length, dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, length, dim, generator=gen).to(dtype)
    return q, k, v


@pytest.mark.parametrize(("dtype", "tol", "router"), [(torch.float32, 2e-5, "learned"), (torch.bfloat16, 3e-2, "norm")])
def test_kernel_path_matches_the_torch_path_with_gradients(triton_target, dtype, tol, router):
    model = tiny_model("llama").to(triton_target)
    module = model.model.layers[0].self_attn
    q, k, v = (t.to(triton_target) for t in _attention_inputs(dtype))
    mask = left_pad({"input_ids": torch.ones(2, 40, dtype=torch.long)}, [0, 9])["attention_mask"].bool()
    mask = mask.to(triton_target)
    mask4 = mask[:, None, None, :] & torch.ones(40, 40, dtype=torch.bool, device=triton_target).tril()[None, None]
    outs, grads = {}, {}
    for backend in ("torch", "triton"):
        state = moh.make_moh_state(module, _config(backend=backend, router=router, route_block=16, init_std=0.1),
                                   0, "text", PatchContext())
        module.add_module("patchattn", state)
        inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out, _ = moh.moh_attention(module, *inputs, mask4, scaling=0.25)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(triton_target, dtype)
        weight = weight * mask[:, :, None, None]
        (out * weight).sum().backward()
        outs[backend] = out * mask[:, :, None, None]
        grads[backend] = [t.grad for t in inputs]
        if router == "learned":
            grads[backend].append(state.router_weight.grad)
    del module._modules["patchattn"]
    assert max_abs_diff(outs["torch"], outs["triton"]) <= tol
    for a, b in zip(grads["torch"], grads["triton"]):
        assert max_abs_diff(a, b) <= tol * 10


@pytest.mark.parametrize("route_block", [1, 4])
def test_cached_decoding_equals_a_full_forward(route_block):
    """Routing is causal (per-block routing uses the block's first token), so prefill + decode = one pass."""
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 21))
    with torch.no_grad(), patchattn.patched(model, "moh", route_block=route_block):
        full = model(input_ids=ids).logits
        assert max_abs_diff(decoded_rows(model, ids, 18), full[:, 17:]) <= 1e-5


def test_route_block_shares_one_decision_per_block():
    model = tiny_model("llama")
    state = _state(model, route_block=8, shared_heads=0, top_k=2, active_ratio=0.5)
    query, value = torch.randn(1, 4, 20, 16), torch.randn(1, 2, 20, 16)
    _, active = moh.route(state, query, value, None, None)
    for start in (0, 8, 16):
        block = active[0, start:start + 8]
        assert (block == block[0]).all()


def test_learned_router_parameters_loss_and_determinism():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 24))
    with patchattn.patched(model, "moh", router="learned", seed=3):
        params = moh.router_parameters(model)
        assert sorted(params) == sorted(f"model.layers.{i}.self_attn.patchattn.{n}" for i in range(2)
                                        for n in ("router_weight", "router_bias", "shared_weight", "type_weight"))
        first = {n: p.detach().clone() for n, p in params.items()}
        logits = model(input_ids=ids).logits
        loss = logits.float().logsumexp(-1).mean() + moh.aux_loss(model)
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params.values())
        assert params["model.layers.0.self_attn.patchattn.router_weight"].grad.abs().sum() > 0
        assert moh.aux_loss(model, scaled=False).item() == pytest.approx(moh.aux_loss(model).item() / 0.01)
        saved = {n: p.detach() + torch.randn(p.shape) for n, p in params.items()}  # (a constant shift is a no-op)
        model.load_state_dict(saved, strict=False)
        moved = model(input_ids=ids).logits
    with patchattn.patched(model, "moh", router="learned", seed=3):
        assert all(torch.equal(first[n], p) for n, p in moh.router_parameters(model).items())
        assert not torch.equal(model(input_ids=ids).logits, moved)
    with patchattn.patched(model, "moh", router="learned", seed=4):
        assert not torch.equal(first["model.layers.0.self_attn.patchattn.router_weight"],
                               moh.router_parameters(model)["model.layers.0.self_attn.patchattn.router_weight"])
    assert not any(".patchattn." in n for n, _ in model.named_parameters())


def test_balance_loss_is_one_when_routing_is_uniform_and_larger_when_collapsed():
    probs = torch.full((1, 8, 4), 0.25)
    spread = torch.zeros(1, 8, 4, dtype=torch.bool)
    spread[0, torch.arange(8), torch.arange(8) % 4] = True
    assert moh._balance_loss(probs, spread, None, 1).item() == pytest.approx(1.0)
    collapsed = torch.zeros_like(spread)
    collapsed[..., 0] = True
    peaked = torch.tensor([0.7, 0.1, 0.1, 0.1]).expand(1, 8, 4)
    assert moh._balance_loss(peaked, collapsed, None, 1).item() == pytest.approx(2.8)


def test_aux_loss_needs_a_forward():
    model = tiny_model("llama")
    with patchattn.patched(model, "moh", router="learned"), pytest.raises(ValueError, match="no moh-patched layer"):
        moh.aux_loss(model)


def test_model_without_config_is_refused_clearly():
    module = types.SimpleNamespace()
    with pytest.raises(ValueError, match="no model config"):
        moh.make_moh_state(module, _config(), 0, "text", PatchContext())
    assert isinstance(PatchState(_config(), 0, "text", PatchContext()), torch.nn.Module)
