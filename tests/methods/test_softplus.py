"""softplus (LSSA / LSSAR): the chunked torch path against an eager float64 T x T oracle (forward and gradients, fp32
/ bf16, odd lengths, GQA, left padding, chunks that do not divide the length); rows sum to 1 and the re-weighting
keeps only above-uniform weights; the dense-equivalent setting is the model's softmax exactly; padded rows equal rows
alone; KV-cached decoding equals a full forward; unpatch exact; the recipe trains 2 steps and reloads."""

import json
import math

import pytest
import torch
from decode_cases import decoded_rows, static_decode_step

import patchattn
from patchattn.methods import softplus
from patchattn.state import PatchContext, PatchState
from patchattn.testing import left_pad, max_abs_diff, tiny_model
from patchattn.train import RunOptions, load_recipe, train_model

SMOKE = {"steps": 2, "seq_len": 48, "eval_chunks": 1, "warmup": 1, "save_every": 0, "lr": 5e-2, "model": "tiny-llama"}


def _valid(real, length):
    return real[:, None, :] & torch.ones(length, length, dtype=torch.bool).tril()[None]


def _run(module, config, q, k, v, mask4, scaling):
    module.add_module("patchattn", PatchState(config, 0, "text", PatchContext()))
    try:
        return softplus.softplus_attention(module, q, k, v, mask4, scaling=scaling)[0]
    finally:
        del module._modules["patchattn"]


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize(("reweight", "train_len", "chunk"), [(True, 16, 7), (False, 2048, 64), (True, 2048, 5)])
def test_chunked_path_matches_the_eager_reference(dtype, tol, reweight, train_len, chunk):
    model = tiny_model("llama")  # 4 query heads, 2 KV heads (GQA)
    module = model.model.layers[0].self_attn
    config = patchattn.get_config("softplus", reweight=reweight, train_len=train_len, chunk=chunk)
    gen = torch.Generator().manual_seed(2)
    length = 29  # odd, not a multiple of the chunk
    q, k = torch.randn(2, 4, length, 16, generator=gen) * 2, torch.randn(2, 2, length, 16, generator=gen) * 2
    v = torch.randn(2, 2, length, 16, generator=gen)
    real = torch.ones(2, length, dtype=torch.bool)
    real[1, :8] = False  # left padding
    valid = _valid(real, length)
    inputs = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
    out = _run(module, config, *inputs, valid[:, None], 0.25)
    weight = torch.randn(out.shape, generator=gen) * real[:, :, None, None]
    (out.float() * weight).sum().backward()
    ref_in = [t.detach().double().requires_grad_(True) for t in inputs]
    ref = softplus.softplus_reference(*ref_in, valid, scale=0.25, train_len=train_len, reweight=reweight)
    ref = ref.transpose(1, 2)
    rows = real[:, :, None, None]
    assert max_abs_diff(out.double() * rows, ref * rows) <= tol * 4
    assert (out[~real] == 0).all()  # padded queries see nothing
    (ref * weight.double()).sum().backward()
    for a, b in zip(inputs, ref_in):
        assert torch.isfinite(a.grad).all()
        assert max_abs_diff(a.grad.double(), b.grad) <= tol * 40


def test_weights_sum_to_one_and_reweighting_keeps_only_above_uniform():
    config = patchattn.get_config("softplus", train_len=8)
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(1, 3, 12, 12, generator=gen) * 3
    valid = _valid(torch.ones(1, 12, dtype=torch.bool), 12)
    positions = torch.arange(12)[None]
    lssa = softplus.attention_weights(config.replace(reweight=False), logits, valid, positions, 16)
    lssar = softplus.attention_weights(config, logits, valid, positions, 16)
    for w in (lssa, lssar):
        assert torch.allclose(w.sum(-1), torch.ones(1, 3, 12), atol=1e-6)
        assert (w[..., ~valid[0]] == 0).all()
    n = valid.sum(-1)[:, None, :, None].float()
    below = (n * lssa <= 1) & valid[:, None]
    assert (lssar[below & (positions[:, None, :, None] >= 1)] == 0).all()
    assert torch.equal(lssar[:, :, 0], lssa[:, :, 0])  # the exempt first row
    # sharper: the re-weighted rows carry more mass on their top key
    assert (lssar[:, :, 1:].amax(-1) >= lssa[:, :, 1:].amax(-1) - 1e-6).all()
    # The length scale: log n / log train_len (0 at n=1, 1 at train_len, growing past it), min_scale floors it.
    counts = torch.tensor([1.0, 8.0, 64.0])
    assert torch.allclose(softplus.length_scale(config, counts, 16), torch.tensor([0.0, 1.0, 2.0]))
    floored = softplus.length_scale(config.replace(min_scale=1.0), counts, 16)
    assert torch.allclose(floored, torch.tensor([1.0, 1.0, 2.0]))
    paper_3p = softplus.length_scale(config.replace(scale="log_d_log_n"), counts, 16)
    assert torch.allclose(paper_3p, math.log(16) * torch.log(counts))


def test_dense_equivalent_is_the_models_softmax_exactly_and_the_default_is_not():
    model = tiny_model("llama")
    inputs = left_pad({"input_ids": torch.randint(3, 100, (2, 30))}, [0, 5])
    with torch.no_grad():
        reference = model(**inputs).logits
        with patchattn.patched(model, "softplus", **softplus.SoftplusConfig.DENSE_EQUIVALENT):
            assert torch.equal(model(**inputs).logits, reference)
        with patchattn.patched(model, "softplus"):
            assert max_abs_diff(model(**inputs).logits, reference) > 1e-2


def test_exp_map_on_the_chunked_path_is_softmax():
    gen = torch.Generator().manual_seed(6)
    q, k, v = torch.randn(1, 4, 19, 16, generator=gen), torch.randn(1, 2, 19, 16, generator=gen), torch.randn(
        1, 2, 19, 16, generator=gen)
    valid = _valid(torch.ones(1, 19, dtype=torch.bool), 19)
    config = patchattn.get_config("softplus", positive_map="exp", scale="none", reweight=False, chunk=4)
    out = softplus.softplus_core(config, q, k, v, valid, scale=0.25)
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                            is_causal=True, scale=0.25)
    assert max_abs_diff(out, want) <= 1e-6


@pytest.mark.parametrize("config", [{}, {"qk_norm": True, "scale": "log_d_log_n"}])
def test_padded_rows_equal_rows_alone(config):
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 23))
    with torch.no_grad(), patchattn.patched(model, "softplus", train_len=8, chunk=5, **config):
        batch = left_pad({"input_ids": ids.clone()}, [0, 6])
        positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        out = model(**batch, position_ids=positions).logits
        assert max_abs_diff(out[1, 6:], model(input_ids=ids[1:, :17]).logits[0]) <= 1e-5
        assert max_abs_diff(out[0], model(input_ids=ids[:1]).logits[0]) <= 1e-5


def test_cached_decoding_equals_a_full_forward():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 21))
    with torch.no_grad(), patchattn.patched(model, "softplus", train_len=8, chunk=4):
        full = model(input_ids=ids).logits
        assert max_abs_diff(decoded_rows(model, ids, 18), full[:, 17:]) <= 1e-5


def test_unpatch_is_exact():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 19))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        patchattn.patch(model, "softplus")
        assert max_abs_diff(model(input_ids=ids).logits, reference) > 1e-2
        patchattn.unpatch(model)
        assert torch.equal(model(input_ids=ids).logits, reference)


def test_recipe_trains_two_steps_and_reloads(tmp_path):
    recipe = load_recipe("softplus", {**SMOKE, "output_dir": str(tmp_path / "run")})
    assert recipe.patch["method"] == "softplus" and recipe.patch["train_len"] == 2048  # the shipped seq_len
    metrics, tuned = train_model(recipe, RunOptions(progress=False))
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if "lm_loss" in line]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    assert metrics["ppl_before"] != metrics["ppl_dense"]
    inputs = {"input_ids": torch.randint(3, 100, (2, 20))}
    with torch.no_grad():
        want = tuned(**inputs).logits
        model, _ = patchattn.load("tiny-llama", adapter=str(tmp_path / "run"))
        assert torch.allclose(model(**inputs).logits, want, atol=1e-6)
        assert patchattn.get_handle(model).config.method == "softplus"


def test_static_cache_decode_step_compiles_whole_and_equals_the_default_cache():
    """KeyBounds: the step reads its rows on the device (empty slots hidden by the mask)."""
    torch._dynamo.reset()
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    with patchattn.patched(model, "softplus", train_len=8, chunk=16):
        got, want, default = static_decode_step(model, ids, mask)
    assert max_abs_diff(got, want) < 1e-5
    assert max_abs_diff(want, default) < 1e-5


def test_rows_that_see_nothing_give_zeros_and_finite_gradients():
    gen = torch.Generator().manual_seed(8)
    valid = _valid(torch.ones(2, 13, dtype=torch.bool), 13)
    valid[1, :4] = False  # padding queries: no key at all
    valid[1, :, :4] = False
    for overrides in ({}, {"positive_map": "exp"}, {"positive_map": "exp", "reweight": False, "min_scale": 1.0}):
        config = patchattn.get_config("softplus", chunk=5, train_len=8, **overrides)
        q = torch.randn(2, 4, 13, 8, generator=gen, requires_grad=True)
        k, v = (torch.randn(2, 2, 13, 8, generator=gen, requires_grad=True) for _ in range(2))
        out = softplus.softplus_core(config, q, k, v, valid, scale=0.3)
        out.sum().backward()
        assert (out[1, :, :4] == 0).all(), overrides
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v)), overrides
