"""selective (SSA): the q/v-rescaled model attention against an eager float64 oracle (forward, gradients of q/k/v and
of the temperature parameters, fp32/bf16, odd lengths, GQA, left padding); the initial / dense-equivalent settings;
padded rows equal rows alone; KV-cached decoding equals a full forward; parameters saved and reloaded with the
adapter; unpatch exact; the recipe trains 2 steps and reloads."""

import json
import math

import pytest
import torch
from decode_cases import decoded_rows, static_decode_step

import patchattn
from patchattn.methods import selective
from patchattn.state import PatchContext
from patchattn.testing import left_pad, max_abs_diff, tiny_model
from patchattn.train import RunOptions, load_recipe, train_model

SMOKE = {"steps": 2, "seq_len": 48, "eval_chunks": 1, "warmup": 1, "save_every": 0, "lr": 5e-2, "model": "tiny-llama"}


def _randomise(state, gen, beta):
    """Non-trivial temperatures: every parameter away from its dense initialisation."""
    with torch.no_grad():
        for name, p in state.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 if name != "position_beta" else torch.full_like(p, beta))


def _valid(mask, length):
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return mask[:, None, :] & causal[None]


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize(("position", "token_input", "beta"), [("exp", "query", -1.0), ("linear", "value", 0.3)])
def test_model_attention_with_temperatures_matches_the_eager_reference(dtype, tol, position, token_input, beta):
    model = tiny_model("llama")  # 4 query heads, 2 KV heads (GQA)
    module = model.model.layers[0].self_attn
    config = patchattn.get_config("selective", position=position, token_input=token_input)
    state = selective.make_selective_state(module, config, 0, "text", PatchContext())
    gen = torch.Generator().manual_seed(3)
    _randomise(state, gen, beta)
    module.add_module("patchattn", state)
    length = 37  # odd
    q = torch.randn(2, 4, length, 16, generator=gen)
    k = torch.randn(2, 2, length, 16, generator=gen)
    v = torch.randn(2, 2, length, 16, generator=gen)
    real = torch.ones(2, length, dtype=torch.bool)
    real[1, :9] = False  # left padding
    valid = _valid(real, length)
    mask4 = valid[:, None]
    inputs = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
    try:
        out, _ = selective.selective_attention(module, *inputs, mask4, scaling=0.25)
        weight = torch.randn(out.shape, generator=gen) * real[:, :, None, None]
        (out.float() * weight).sum().backward()
        params = dict(state.named_parameters())
        ref_in = [t.detach().double().requires_grad_(True) for t in inputs]
        ref_params = {n: p.detach().double().requires_grad_(True) for n, p in params.items()}
        ref = selective.selective_reference(
            *ref_in, valid, scale=0.25, beta=ref_params["position_beta"], position=position,
            query_weight=ref_params["query_weight"], query_bias=ref_params["query_bias"], token_input=token_input,
            value_weight=ref_params["value_weight"], value_bias=ref_params["value_bias"]).transpose(1, 2)
    finally:
        del module._modules["patchattn"]
    rows = real[:, :, None, None]
    assert max_abs_diff(out.double() * rows, ref * rows) <= tol * 4
    # The reference's beta enters through Python floats; its gradient is checked through the model test below.
    (ref * weight.double()).sum().backward()
    for a, b in zip(inputs, ref_in):
        assert max_abs_diff(a.grad.double(), b.grad) <= tol * 20
    for name in ("query_weight", "query_bias", "value_weight", "value_bias"):
        assert params[name].grad.abs().sum() > 0
        assert max_abs_diff(params[name].grad.double(), ref_params[name].grad) <= tol * 50


def test_position_beta_gets_the_exact_gradient():
    """d out / d beta against a central finite difference of the float64 reference."""
    model = tiny_model("llama")
    module = model.model.layers[0].self_attn
    config = patchattn.get_config("selective", query_temperature=False, value_temperature=False)
    state = selective.make_selective_state(module, config, 0, "text", PatchContext())
    gen = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(1, 4, 20, 16, generator=gen), torch.randn(1, 2, 20, 16, generator=gen), torch.randn(
        1, 2, 20, 16, generator=gen)
    with torch.no_grad():
        state.position_beta.fill_(-0.5)
    module.add_module("patchattn", state)
    try:
        out, _ = selective.selective_attention(module, q, k, v, None, scaling=0.25)
    finally:
        del module._modules["patchattn"]
    out.sum().backward()
    valid = _valid(torch.ones(1, 20, dtype=torch.bool), 20)
    eps = 1e-5
    plus = selective.selective_reference(q, k, v, valid, scale=0.25, beta=-0.5 + eps).sum()
    minus = selective.selective_reference(q, k, v, valid, scale=0.25, beta=-0.5 - eps).sum()
    numeric = (plus - minus) / (2 * eps)
    assert state.position_beta.grad.item() == pytest.approx(numeric.item(), rel=1e-3)


def test_initial_setting_and_dense_equivalent():
    model = tiny_model("llama")
    inputs = left_pad({"input_ids": torch.randint(3, 100, (2, 30))}, [0, 5])
    with torch.no_grad():
        reference = model(**inputs).logits
        with patchattn.patched(model, "selective", **selective.SelectiveConfig.DENSE_EQUIVALENT):
            assert torch.equal(model(**inputs).logits, reference)
        # 'linear' position (beta = 0) and zero token/value weights: every temperature is exactly 1 at step 0.
        with patchattn.patched(model, "selective", position="linear"):
            assert torch.equal(model(**inputs).logits, reference)
        # The released code's exp form with beta = 2: 1 + exp(-e^2) log n, near dense but not equal.
        with patchattn.patched(model, "selective"):
            diff = max_abs_diff(model(**inputs).logits, reference)
            assert 0 < diff < 1e-3
        with patchattn.patched(model, "selective", position="linear", beta_init=0.5):
            assert max_abs_diff(model(**inputs).logits, reference) > 1e-3


def test_parameters_are_few_and_named_on_the_patch_state():
    model = tiny_model("llama")
    with patchattn.patched(model, "selective"):
        names = sorted(n for n, _ in model.named_parameters() if ".patchattn." in n)
        assert names == sorted(f"model.layers.{i}.self_attn.patchattn.{p}" for i in range(2) for p in
                               ("position_beta", "query_weight", "query_bias", "value_weight", "value_bias"))
        new = sum(p.numel() for n, p in model.named_parameters() if ".patchattn." in n)
        attn = sum(p.numel() for n, p in model.named_parameters() if "self_attn" in n and ".patchattn." not in n)
        assert new == 2 * (1 + 4 * (2 * 16) + 4 + 2 * 16 + 2)  # beta, u [H, Hkv*D], b, w [Hkv, D], c
        assert new < 0.05 * attn  # tiny model; on Llama-3-8B it is 0.002% of a layer
    assert not any(".patchattn." in n for n, _ in model.named_parameters())


def _moved(model, beta=-1.0):
    gen = torch.Generator().manual_seed(7)
    for module in model.modules():
        state = patchattn.state.get_state(module)
        if state is not None:
            _randomise(state, gen, beta)


@pytest.mark.parametrize("token_input", ["value", "query"])
def test_padded_rows_equal_rows_alone(token_input):
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 23))
    with torch.no_grad(), patchattn.patched(model, "selective", token_input=token_input):
        _moved(model)
        batch = left_pad({"input_ids": ids.clone()}, [0, 6])
        positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # as generate() numbers padded rows
        out = model(**batch, position_ids=positions).logits
        alone = model(input_ids=ids[1:, :17]).logits
        assert max_abs_diff(out[1, 6:], alone[0]) <= 1e-5
        assert max_abs_diff(out[0], model(input_ids=ids[:1]).logits[0]) <= 1e-5


@pytest.mark.parametrize("token_input", ["value", "query"])
def test_cached_decoding_equals_a_full_forward(token_input):
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 21))
    with torch.no_grad(), patchattn.patched(model, "selective", token_input=token_input):
        _moved(model)
        full = model(input_ids=ids).logits
        assert max_abs_diff(decoded_rows(model, ids, 18), full[:, 17:]) <= 1e-5


def test_unpatch_is_exact():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 19))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        patchattn.patch(model, "selective")
        _moved(model)
        assert max_abs_diff(model(input_ids=ids).logits, reference) > 1e-3
        patchattn.unpatch(model)
        assert torch.equal(model(input_ids=ids).logits, reference)
    assert not any(".patchattn." in n for n, _ in model.named_parameters())


def test_recipe_trains_two_steps_and_reloads_the_temperatures(tmp_path):
    recipe = load_recipe("selective", {**SMOKE, "output_dir": str(tmp_path / "run")})
    assert recipe.patch["method"] == "selective"
    _, tuned = train_model(recipe, RunOptions(progress=False))
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if "lm_loss" in line]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    trained = {n: p.detach().clone() for n, p in tuned.named_parameters() if ".patchattn." in n}
    assert trained and all(p.requires_grad for n, p in tuned.named_parameters() if ".patchattn." in n)
    assert any(n.endswith("query_weight") and p.abs().sum() > 0 for n, p in trained.items())  # moved off zero
    inputs = {"input_ids": torch.randint(3, 100, (2, 20))}
    with torch.no_grad():
        want = tuned(**inputs).logits
        model, _ = patchattn.load("tiny-llama", adapter=str(tmp_path / "run"))
        assert torch.allclose(model(**inputs).logits, want, atol=1e-6)
        def by_layer(params):  # peft's prefixes differ between the tuned and the reloaded model
            return {n[n.index("layers."):]: p for n, p in params}

        reloaded = by_layer((n, p) for n, p in model.named_parameters() if ".patchattn." in n)
        assert reloaded.keys() == by_layer(trained.items()).keys()
        assert all(torch.equal(reloaded[n], p) for n, p in by_layer(trained.items()).items())
        assert patchattn.get_handle(model).config.method == "selective"


def test_static_cache_decode_step_compiles_whole_and_equals_the_default_cache():
    """KeyBounds: the step reads its rows on the device (the token's own values sit before the empty slots)."""
    torch._dynamo.reset()
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    with patchattn.patched(model, "selective", token_input="value"):
        _moved(model)
        got, want, default = static_decode_step(model, ids, mask)
    assert max_abs_diff(got, want) < 1e-5
    assert max_abs_diff(want, default) < 1e-5
