"""lightning / hybrid: one converted layer against an independent oracle (feature map, decay schedule, denominator,
gate, GQA), left padding (a padded row equals the row alone), decoding from the kept recurrent state equals one
pass (and really uses the state; a reordered cache is rebuilt), the Triton path (interpreter) equals the torch
path with gradients, hybrid's layer plan and its dense equivalence, unpatch, the attention-transfer loss, and both
recipes: two steps on the tiny model, then ``patchattn.load(..., adapter=...)`` gives the same logits."""

import json
import math

import pytest
import torch

import patchattn
from patchattn.kernels.lightning import alibi_slopes, naive_linear_attention
from patchattn.methods import hybrid, lightning
from patchattn.registry import get_spec
from patchattn.testing import left_pad, max_abs_diff, tiny_model


def _attn(model, layer=0):
    return model.model.layers[layer].self_attn


def _perturb(model, seed=1):
    """Move the conversion parameters off their initial values (as training would)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lightning.conversion_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)


def _oracle(state, query, key, value, layer, layers, normalize="sum"):
    """The converted layer written out from the definition (hedgehog features, TNL slopes, denominator or RMS norm,
    gate), GQA by repeating the kv heads."""
    heads, kv_heads = query.shape[1], key.shape[1]
    groups = heads // kv_heads

    def phi(x, weight):
        proj = torch.einsum("bhtd,hde->bhte", x.float(), weight.float())
        return torch.cat([proj.softmax(-1), (-proj).softmax(-1)], -1)

    fq = phi(query, state.feature_q)
    fk = phi(key, state.feature_k).repeat_interleave(groups, 1)
    v = value.float().repeat_interleave(groups, 1)
    slopes = torch.tensor(alibi_slopes(heads)) * (1 - layer / (layers - 1) + 1e-5)
    num, _ = naive_linear_attention(fq, fk, v, slopes)
    if normalize == "sum":
        den, _ = naive_linear_attention(fq, fk, torch.ones_like(v[..., :1]), slopes)
        out = (num / den).transpose(1, 2)
    else:
        flat = num.transpose(1, 2).flatten(2)
        out = (flat / flat.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * state.norm_weight).view(
            *flat.shape[:2], heads, -1)
    x = value.float().permute(0, 2, 1, 3).flatten(2)
    gate = 2 * torch.sigmoid(x @ state.gate_down.t() @ state.gate_up.t())
    return out * gate.view_as(out)


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="must be one of"):
        patchattn.get_config("lightning", feature_map="relu")
    with pytest.raises(ValueError, match="normalize='rms'"):
        patchattn.get_config("lightning", feature_map="silu", normalize="sum")
    assert patchattn.get_config("lightning", feature_map="silu", normalize="rms").feature_map == "silu"
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="layer"):
        patchattn.patch(model, "hybrid", softmax_layers=[5])


@pytest.mark.parametrize("normalize", ["sum", "rms"])
def test_one_layer_matches_the_oracle(normalize):
    model = tiny_model("llama")  # 4 query heads, 2 kv heads (GQA), 2 layers
    with patchattn.patched(model, "lightning", normalize=normalize):
        _perturb(model)
        module = _attn(model, 1)
        query, key, value = torch.randn(2, 4, 23, 16), torch.randn(2, 2, 23, 16), torch.randn(2, 2, 23, 16)
        with torch.no_grad():
            out, _ = get_spec("lightning").forward(module, query, key, value, None, scaling=0.25)
            want = _oracle(module.patchattn, query, key, value, layer=1, layers=2, normalize=normalize)
    assert max_abs_diff(out, want) <= 1e-4


def test_a_16bit_layer_feeds_the_kernel_16bit_and_stays_close_to_the_float32_oracle(monkeypatch):
    """The kernel's products run in the model's dtype (float32 features sent a bf16 model down the kernel's float32
    path, 30x slower than SDPA on an H100: bench/linear/lightning.csv); its output comes back in float32 so the
    denominator division is not rounded twice."""
    from patchattn.methods import _lightning

    seen = []
    real = _lightning.lightning_attention

    def spy(q, k, v, *args, **kwargs):
        out = real(q, k, v, *args, **kwargs)
        seen.append((q.dtype, k.dtype, v.dtype, out[0].dtype))
        return out

    monkeypatch.setattr(_lightning, "lightning_attention", spy)
    model = tiny_model("llama")
    with patchattn.patched(model, "lightning"):
        _perturb(model)
        module = _attn(model, 1)
        gen = torch.Generator().manual_seed(3)
        query, key, value = (torch.randn(2, h, 23, 16, generator=gen) for h in (4, 2, 2))
        with torch.no_grad():
            out, _ = get_spec("lightning").forward(module, query.bfloat16(), key.bfloat16(), value.bfloat16(), None,
                                                   scaling=0.25)
            want = _oracle(module.patchattn, query.bfloat16(), key.bfloat16(), value.bfloat16(), layer=1, layers=2)
    assert seen == [(torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.float32)]
    assert out.dtype == torch.bfloat16
    assert max_abs_diff(out, want) <= 3e-2 * want.abs().max().item()


def test_decay_schedules():
    model = tiny_model("llama")
    for decay, expected in (("alibi", alibi_slopes(4)), ("none", [0.0] * 4),
                            ("tnl", [s * (1 - 1 + 1e-5) for s in alibi_slopes(4)])):
        with patchattn.patched(model, "lightning", decay=decay):
            slopes = _attn(model, 1).patchattn.method_state.slopes
            assert slopes.tolist() == pytest.approx(expected)


def test_patched_model_differs_from_dense_and_unpatch_is_exact():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 30))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        handle = patchattn.patch(model, "lightning")
        assert max_abs_diff(model(input_ids=ids).logits, reference) > 1e-3
        names = [n for n, _ in model.named_parameters() if ".patchattn." in n]
        assert {n.split(".")[-1] for n in names} == {"feature_q", "feature_k", "gate_down", "gate_up"}
        patchattn.unpatch(model)
        assert not [n for n, _ in model.named_parameters() if ".patchattn." in n]
        assert torch.equal(model(input_ids=ids).logits, reference)
    assert handle is not None


@pytest.mark.parametrize("method,overrides,family", [
    ("lightning", {}, "llama"), ("lightning", {"feature_map": "elu"}, "llama"),
    ("lightning", {}, "gemma3_text"),  # sliding-window layers: padding read from the mask's diagonal
    ("hybrid", {"softmax_every": 2}, "llama"), ("hybrid", {"softmax_every": 2, "softmax_window": 5}, "llama")])
def test_left_padded_rows_equal_the_rows_alone(method, overrides, family):
    model = tiny_model(family)
    ids = torch.randint(3, 100, (2, 26))
    inputs = left_pad({"input_ids": ids}, [0, 7])
    # Positions as generate() gives them (from the mask): phi(R q) . phi(R k) is not invariant to shifting RoPE.
    inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), patchattn.patched(model, method, **overrides):
        _perturb(model)
        batch = model(**inputs).logits
        alone = model(input_ids=inputs["input_ids"][1:, 7:]).logits
    assert max_abs_diff(batch[1, 7:], alone[0]) <= 1e-4


@pytest.mark.parametrize("method,overrides", [("lightning", {}), ("lightning", {"feature_map": "silu",
                                                                               "normalize": "rms"}),
                                              ("hybrid", {"softmax_every": 2, "softmax_window": 4})])
def test_decoding_from_the_kept_state_equals_one_pass(method, overrides):
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 21))
    with torch.no_grad(), patchattn.patched(model, method, **overrides):
        _perturb(model)
        full = model(input_ids=ids).logits[:, -3:]
        out = model(input_ids=ids[:, :18], use_cache=True)
        state = _attn(model, 0).patchattn.method_state
        assert state.tokens == 18 and state.kv is not None
        cache, steps = out.past_key_values, []
        for t in range(18, 21):
            out = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[:, -1])
        assert state.tokens == 21
    assert max_abs_diff(torch.stack(steps, 1), full) <= 1e-4


def test_decoding_really_continues_from_the_state_and_rebuilds_it_for_another_cache():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 13))
    with torch.no_grad(), patchattn.patched(model, "lightning"):
        full = model(input_ids=ids).logits[:, -1]
        out = model(input_ids=ids[:, :12], use_cache=True)
        states = [_attn(model, i).patchattn.method_state for i in range(2)]
        kept = [s.kv.clone() for s in states]
        for s in states:
            s.kv.mul_(0.5)  # a corrupted state must show: the step reads it instead of the cache
        step = model(input_ids=ids[:, 12:], past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
        assert max_abs_diff(step, full) > 1e-3
        out = model(input_ids=ids[:, :12], use_cache=True)
        for s in states:
            s.last_key.add_(1.0)  # not the cache it was built from: rebuilt from the cached keys
        step = model(input_ids=ids[:, 12:], past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
        assert max_abs_diff(step, full) <= 1e-4
    assert all(k.shape == (2, 4, 32, 17) for k in kept)  # [B, Hq, 2*D hedgehog features, D + denominator]


def test_triton_path_matches_the_torch_path_with_gradients(triton_interpreter):
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 40))
    inputs = left_pad({"input_ids": ids}, [0, 5])
    results = []
    for backend in ("torch", "triton"):
        with patchattn.patched(model, "lightning", backend=backend, block_size=16):
            _perturb(model)
            model.zero_grad()
            logits = model(**inputs).logits
            logits[:, 5:].float().pow(2).mean().backward()
            grads = {n: p.grad.clone() for n, p in lightning.conversion_parameters(model).items()}
            results.append((logits.detach(), grads, model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    (a, ga, qa), (b, gb, qb) = results
    assert max_abs_diff(a, b) <= 1e-4
    assert ga.keys() == gb.keys() and all(max_abs_diff(ga[n], gb[n]) <= 1e-4 for n in ga)
    assert max_abs_diff(qa, qb) <= 1e-4


def test_inference_kernels_match_the_torch_path_with_padding_and_decoding(triton_interpreter, monkeypatch):
    """Without gradients the layer runs the fused kernels (hedgehog features, the normalised lightning forward):
    the same logits as the torch path for a left-padded prefill and for decode steps from the kept state."""
    from patchattn.kernels.hedgehog import triton_fwd as hedgehog_fwd
    from patchattn.kernels.lightning import triton_fwd as lightning_fwd

    fused = []
    for module, name in ((hedgehog_fwd, "hedgehog_forward"), (lightning_fwd, "lightning_forward")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k: fused.append(
            (_name, k.get("normalized"))) or _real(*a, **k))
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 24))
    inputs = left_pad({"input_ids": ids[:, :21]}, [0, 5])
    results = []
    for backend in ("torch", "triton"):
        with torch.no_grad(), patchattn.patched(model, "lightning", backend=backend, block_size=16):
            _perturb(model)
            out = model(**inputs, use_cache=True)
            mask = inputs["attention_mask"]
            steps = []
            for i in range(3):
                mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], -1)
                out = model(input_ids=ids[:, 21 + i:22 + i], attention_mask=mask,
                            past_key_values=out.past_key_values, use_cache=True)
                steps.append(out.logits[:, -1])
            results.append((model(**inputs).logits[:, 5:], torch.stack(steps)))
    (prefill_a, steps_a), (prefill_b, steps_b) = results
    assert ("lightning_forward", True) in fused and ("hedgehog_forward", None) in fused
    assert max_abs_diff(prefill_a, prefill_b) <= 1e-4
    assert max_abs_diff(steps_a, steps_b) <= 1e-4


def test_hybrid_layer_plan_and_dense_softmax_layers():
    config = patchattn.get_config("hybrid")
    assert hybrid.softmax_layer_indices(config, 32) == [7, 15, 23, 31]  # MiniMax-01: 7 lightning : 1 softmax
    assert hybrid.softmax_layer_indices(patchattn.get_config("hybrid", softmax_layers=[3, 0]), 32) == [0, 3]
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 30))
    inputs = left_pad({"input_ids": ids}, [0, 4])
    with torch.no_grad():
        reference = model(**inputs).logits
        with patchattn.patched(model, "hybrid", softmax_layers=[0, 1]):  # every layer softmax: dense exactly
            assert torch.equal(model(**inputs).logits, reference)
            assert not lightning.conversion_parameters(model)
        with patchattn.patched(model, "hybrid", **hybrid.HybridConfig.DENSE_EQUIVALENT):
            assert torch.equal(model(**inputs).logits, reference)
        with patchattn.patched(model, "hybrid", softmax_layers=[0, 1], softmax_window=30):  # window covers all
            assert max_abs_diff(model(**inputs).logits[1, 4:], reference[1, 4:]) <= 1e-5
            assert max_abs_diff(model(**inputs).logits[0], reference[0]) <= 1e-5
        with patchattn.patched(model, "hybrid", softmax_every=2):
            assert _attn(model, 1).patchattn.method_state.softmax
            names = lightning.conversion_parameters(model)
            assert names and all(".layers.0." in n for n in names)
            assert max_abs_diff(model(**inputs).logits, reference) > 1e-3


def test_softmax_window_matches_an_eager_banded_oracle():
    model = tiny_model("llama")
    with patchattn.patched(model, "hybrid", softmax_layers=[0], softmax_window=3):
        module = _attn(model, 0)
        query, key, value = torch.randn(1, 4, 9, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
        out, _ = get_spec("hybrid").forward(module, query, key, value, None, scaling=0.25)
    k, v = key.repeat_interleave(2, 1), value.repeat_interleave(2, 1)
    scores = query @ k.transpose(-1, -2) * 0.25
    i, j = torch.arange(9)[:, None], torch.arange(9)[None, :]
    scores = scores.masked_fill(~((j <= i) & (i - j < 3)), -math.inf)
    want = (scores.softmax(-1) @ v).transpose(1, 2)
    assert max_abs_diff(out, want) <= 1e-5


def test_transfer_loss_is_the_mse_against_the_softmax_teacher():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="transfer_coef > 0"):
        lightning.transfer_loss(model)
    with patchattn.patched(model, "hybrid", softmax_every=2, transfer_coef=0.5):
        module = _attn(model, 0)
        model.train()
        query, key, value = torch.randn(1, 4, 9, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
        out, _ = get_spec("hybrid").forward(module, query, key, value, None, scaling=0.25)
        k, v = key.repeat_interleave(2, 1), value.repeat_interleave(2, 1)
        teacher = torch.nn.functional.scaled_dot_product_attention(query, k, v, is_causal=True, scale=0.25)
        want = (out - teacher.transpose(1, 2)).pow(2).mean()
        assert hybrid.transfer_loss(model).item() == pytest.approx(0.5 * want.item(), rel=1e-5)
        assert hybrid.transfer_loss(model, scaled=False).requires_grad
        model.eval()


@pytest.mark.parametrize("name", ["lightning", "hybrid"])
def test_recipe_trains_two_steps_and_reloads(name, tmp_path):
    from patchattn.train import RunOptions, load_recipe, train_model

    overrides = {"model": "tiny-llama", "steps": 2, "seq_len": 48, "eval_every": 0, "save_every": 0,
                 "eval_chunks": 1, "warmup": 1, "lr": 5e-2, "decode_eval": None, "output_dir": str(tmp_path / name)}
    recipe = load_recipe(name, overrides)
    if name == "hybrid":
        assert recipe.train.aux_loss == "patchattn.methods.hybrid:transfer_loss"
        recipe.patch["softmax_every"] = 2  # the tiny model has 2 layers: one of each
    if name == "hybrid":
        assert recipe.train.aux_only_steps > 0
        recipe.train.aux_only_steps = 1  # step 1: attention transfer only; step 2: LoRA on the LM loss
    metrics, tuned = train_model(recipe, RunOptions(progress=False))
    assert math.isfinite(metrics["ppl_after"])
    if name == "hybrid":
        log = [json.loads(line) for line in open(tmp_path / name / "log.jsonl") if '"lm_loss"' in line]
        assert log[0]["stage"] == "aux_only" and log[0]["loss"] == log[0]["aux_loss"] > 0
        assert "stage" not in log[1] and log[1]["loss"] == log[1]["lm_loss"]
    params = lightning.conversion_parameters(tuned)
    assert params and all(p.requires_grad for p in params.values())
    init = torch.eye(16).repeat(4, 1, 1)
    assert any(not torch.allclose(p, init) for n, p in params.items() if n.endswith("feature_q")), "trained"
    ids = torch.randint(3, 100, (2, 40))
    with torch.no_grad():
        want = tuned(input_ids=ids).logits
        model, _ = patchattn.load("tiny-llama", adapter=recipe.train.output_dir)
        assert torch.equal(model(input_ids=ids).logits, want)
        fresh = tiny_model("llama")
        with patchattn.patched(fresh, name, **({"softmax_every": 2} if name == "hybrid" else {})):
            assert max_abs_diff(fresh(input_ids=ids).logits, want) > 1e-4  # the reload carried trained parameters


def test_prefill_in_chunks_through_the_cache_equals_one_pass():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 50))
    with torch.no_grad(), patchattn.patched(model, "lightning", block_size=16):
        _perturb(model)
        full = model(input_ids=ids).logits
        out = model(input_ids=ids[:, :20], use_cache=True)
        parts = [out.logits]
        for start, stop in ((20, 37), (37, 50)):
            out = model(input_ids=ids[:, start:stop], past_key_values=out.past_key_values, use_cache=True)
            parts.append(out.logits)
    assert max_abs_diff(torch.cat(parts, 1), full) <= 1e-4


def test_two_stage_training_moves_only_the_patch_parameters_in_the_transfer_stage(tmp_path):
    """aux_only_steps: the first stage updates the conversion parameters on the transfer loss, LoRA stays at its
    initialisation (so the teacher is the base model); the LM stage then moves LoRA too."""
    from patchattn.train import RunOptions, load_recipe, train_model

    overrides = {"model": "tiny-llama", "steps": 1, "seq_len": 32, "eval_every": 0, "save_every": 0,
                 "eval_chunks": 1, "warmup": 0, "lr": 1e-2, "decode_eval": None, "aux_only_steps": 1,
                 "output_dir": str(tmp_path / "stage1")}
    recipe = load_recipe("hybrid", overrides)
    recipe.patch["softmax_every"] = 2
    _, tuned = train_model(recipe, RunOptions(progress=False, evaluate=False))
    lora_b = {n: p for n, p in tuned.named_parameters() if "lora_B" in n}
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b.values())  # LoRA untouched
    init = torch.eye(16).repeat(4, 1, 1)
    assert any(not torch.allclose(p, init) for n, p in tuned.named_parameters() if n.endswith("feature_q"))
    with pytest.raises(patchattn.train.RecipeError, match="aux_only_steps needs an aux_loss"):
        load_recipe("lightning", {"aux_only_steps": 3})
