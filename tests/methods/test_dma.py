"""``dma`` (Trainable Dynamic Mask Attention) against an eager per-row oracle: forward and gradients (into q, k, v,
``dt_proj`` and ``A``), fp32 / bf16, odd lengths, GQA, queries that are the last rows of the keys; window >= length
is dense + bias; padding, KV-cache decoding, parameters saved / reloaded, unpatch, the recipe."""

import json
import math
import shutil
import types

import pytest
import torch
import torch.nn.functional as F
from decode_cases import decoded_rows

import patchattn
from patchattn.methods import dma
from patchattn.testing import left_pad, max_abs_diff, tiny_model


# ---- the oracle: the paper's algorithm, row by row --------------------------------------------------------------
def reference_bias(value, weight, a):
    """``A_h * softplus(dt_proj(V_j))``: V_j = the token's values of all KV heads, concatenated."""
    b, h, t, d = value.shape
    flat = value.permute(0, 2, 1, 3).reshape(b, t, h * d)
    delta = torch.einsum("btf,hf->bht", flat, weight)
    return a[None, :, None] * F.softplus(delta)


def reference_dma(q, k, v, bias, window, scale=None, softcap=None, recency=0.0):
    """Per query row: keep the ``window`` keys of its causal past with the largest ``bias_j + recency * j / window``
    (ties: the later key), then ``softmax(q k^T * scale + bias)`` over the kept keys.  bias ``[B, Hkv, Tk]``; queries
    are the last Tq keys."""
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    k, v, bias = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), bias.repeat_interleave(g, 1)
    scores = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores + bias[:, :, None, :]
    keep = torch.zeros(b, hq, tq, tk, dtype=torch.bool)
    detached = bias.detach()
    for i in range(tq):
        p = tk - tq + i
        for bb in range(b):
            for h in range(hq):
                ranked = sorted(range(p + 1), key=lambda j: (detached[bb, h, j].item() + recency * j / window, j),
                                reverse=True)
                keep[bb, h, i, ranked[:window]] = True
    return torch.softmax(scores.masked_fill(~keep, float("-inf")), -1) @ v


def _state(window, block, weight, a, recency=0.0):
    config = dma.DMAConfig(window=window, block_size=block, backend="torch", recency=recency)
    return types.SimpleNamespace(config=config, dt_proj=weight, a=a, record=lambda **_: None)


def _inputs(dtype, b=2, hq=4, hkv=2, tq=37, tk=37, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, tq, d, generator=gen)
    k = torch.randn(b, hkv, tk, d, generator=gen)
    v = torch.randn(b, hkv, tk, d, generator=gen)
    weight = torch.randn(hkv, hkv * d, generator=gen) * 0.3
    a = torch.randn(hkv, generator=gen)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)], weight.requires_grad_(), a.requires_grad_()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("tq,tk,window,block,softcap,recency", [(37, 37, 9, 16, None, 0.0),
                                                                 (70, 70, 20, 16, 5.0, 0.0),
                                                                 (5, 53, 11, 16, None, 1.0), (1, 45, 7, 32, None, 3.0),
                                                                 (37, 37, 9, 16, None, 1.0)])
def test_forward_and_gradients_match_the_oracle(dtype, tol, tq, tk, window, block, softcap, recency):
    (q, k, v), weight, a = _inputs(dtype, tq=tq, tk=tk)
    state = _state(window, block, weight, a, recency)
    out = dma.dynamic_mask_attention(state, q, k, v, 0.25, softcap)
    grad_out = torch.randn_like(out.float())
    got = torch.autograd.grad((out.float() * grad_out).sum(), (q, k, v, weight, a))

    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, weight, a)]
    bias = reference_bias(leaves[2], leaves[3], leaves[4])
    want_out = reference_dma(*leaves[:3], bias, window, scale=0.25, softcap=softcap, recency=recency)
    want = torch.autograd.grad((want_out * grad_out.double()).sum(), leaves)
    assert max_abs_diff(out, want_out) <= tol
    for name, g, w in zip(["q", "k", "v", "dt_proj", "a"], got, want, strict=True):
        assert max_abs_diff(g, w) <= tol * max(1.0, w.abs().max().item()), name


def test_window_beyond_the_length_is_dense_plus_bias():
    (q, k, v), weight, a = _inputs(torch.float32, tq=50, tk=50)
    out = dma.dynamic_mask_attention(_state(1 << 30, 16, weight, a), q, k, v, 0.25, None)
    bias = reference_bias(v, weight, a).repeat_interleave(2, 1)
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    causal = torch.ones(50, 50, dtype=torch.bool).tril()
    want = F.scaled_dot_product_attention(q, kr, vr, attn_mask=torch.where(causal, bias[:, :, None, :], -math.inf),
                                          scale=0.25)
    assert max_abs_diff(out, want) <= 2e-5


@pytest.mark.parametrize("recency", [0.0, 1.0])
def test_untrained_bias_is_a_sliding_window_of_the_most_recent_keys(recency):
    (q, k, v), weight, a = _inputs(torch.float32, tq=40, tk=40)
    out = dma.dynamic_mask_attention(_state(12, 16, weight, torch.zeros_like(a), recency), q, k, v, 0.25, None)
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    pos = torch.arange(40)
    window = (pos[None] <= pos[:, None]) & (pos[None] > pos[:, None] - 12)
    want = F.scaled_dot_product_attention(q, kr, vr, attn_mask=window, scale=0.25)
    assert max_abs_diff(out, want) <= 2e-5


def test_kept_until_agrees_with_ranking_every_prefix():
    bias = torch.randn(1, 1, 60).round(decimals=1)  # ties on purpose
    until = dma.kept_until(bias, 7)[0, 0]
    for i in range(60):
        ranked = sorted(range(i + 1), key=lambda j: (bias[0, 0, j].item(), j), reverse=True)[:7]
        kept = {j for j in range(i + 1) if i < until[j]}
        assert kept == set(ranked), i


def test_a_tiny_first_step_keeps_the_sliding_window():
    """Issue 23: the first optimiser step moves A off 0 by ~lr; with the default recency the mask must stay the
    untrained sliding window (and the output move by ~A), not jump to the ranking of softplus(dt_proj(V)), which is
    what the paper's bias-only score (recency=0) does and what made a pretrained model's loss jump."""
    (q, k, v), weight, a = _inputs(torch.float32, tq=64, tk=64)
    tiny = torch.full_like(a, 1e-4)
    recency = dma.DMAConfig().recency
    untrained = dma.dynamic_mask_attention(_state(12, 16, weight, torch.zeros_like(a), recency), q, k, v, 0.25, None)
    stepped = dma.dynamic_mask_attention(_state(12, 16, weight, tiny, recency), q, k, v, 0.25, None)
    assert max_abs_diff(stepped, untrained) <= 1e-3
    paper = dma.dynamic_mask_attention(_state(12, 16, weight, tiny, 0.0), q, k, v, 0.25, None)
    assert max_abs_diff(paper, untrained) > 0.1  # the discontinuity the recency term removes


def test_kept_until_with_recency_agrees_with_ranking_every_prefix():
    bias = torch.randn(1, 1, 60) * 0.5
    until = dma.kept_until(bias, 7, 2.0)[0, 0]
    for i in range(60):
        ranked = sorted(range(i + 1), key=lambda j: (bias[0, 0, j].item() + 2.0 * j / 7, j), reverse=True)[:7]
        kept = {j for j in range(i + 1) if i < until[j]}
        assert kept == set(ranked), i


# ---- through a model ----------------------------------------------------------------------------------------------
def _trained_like(model, seed=1):
    """Give every layer's A a non-zero value (as after training) so the bias matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".patchattn.a"):
                p.copy_(torch.randn(p.shape, generator=gen) * 2)


def _logits(model, **inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_dense_equivalent_reproduces_the_model_and_unpatch_is_exact():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 70))
    before = _logits(model, input_ids=ids)
    names = {n for n, _ in model.named_parameters()}
    with patchattn.patched(model, "dma", **dma.DMAConfig.DENSE_EQUIVALENT):
        assert max_abs_diff(_logits(model, input_ids=ids), before) <= 1e-5
    with patchattn.patched(model, "dma", window=16, block_size=16):
        _trained_like(model)
        assert max_abs_diff(_logits(model, input_ids=ids), before) > 1e-3
    assert {n for n, _ in model.named_parameters()} == names
    assert torch.equal(_logits(model, input_ids=ids), before)


def test_padded_rows_get_what_they_get_alone():
    model = tiny_model("qwen3")
    inputs = left_pad({"input_ids": torch.randint(3, 100, (2, 61))}, [0, 17])
    with patchattn.patched(model, "dma", window=13, block_size=16):
        _trained_like(model)
        batch = _logits(model, **inputs)
        alone = _logits(model, input_ids=inputs["input_ids"][1:, 17:])
    assert max_abs_diff(batch[1, 17:], alone[0]) <= 1e-4


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_cached_decoding_equals_the_full_forwards_last_row(dtype, tol):
    model = tiny_model("llama").to(dtype)
    ids = torch.randint(3, 100, (1, 45))
    with patchattn.patched(model, "dma", window=11, block_size=16):
        _trained_like(model)
        full = _logits(model, input_ids=ids)
        assert max_abs_diff(decoded_rows(model, ids, 30), full[:, 29:]) <= tol


def test_gradients_reach_dt_proj_and_a_in_a_model():
    model = tiny_model("llama").train()
    ids = torch.randint(3, 100, (1, 40))
    with patchattn.patched(model, "dma", window=9, block_size=16):
        _trained_like(model)
        model(input_ids=ids, labels=ids).loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if ".patchattn." in n}
    assert len(grads) == 2 * len(model.model.layers)
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())


def test_recipe_trains_two_steps_and_reloads(tmp_path):
    from patchattn.train import RunOptions, load_recipe, train_model
    from patchattn.train.recipe import recipe_folder

    folder = tmp_path / "dma"
    shutil.copytree(recipe_folder("dma"), folder)
    patch = json.loads((folder / "patch.json").read_text())
    assert patch == {"method": "dma", "window": 512}
    (folder / "patch.json").write_text(json.dumps({**patch, "window": 16, "block_size": 16}))
    recipe = load_recipe(str(folder), {"model": "tiny-llama", "steps": 2, "seq_len": 48, "eval_chunks": 1,
                                       "warmup": 1, "save_every": 0, "eval_every": 0, "lr": 5e-2,
                                       "decode_eval": None, "output_dir": str(tmp_path / "run")})
    _, tuned = train_model(recipe, RunOptions(progress=False))
    learned = {n: p for n, p in tuned.named_parameters() if ".patchattn." in n}
    assert learned and any(n.endswith(".a") and p.abs().sum() > 0 for n, p in learned.items())  # A moved off 0
    ids = torch.randint(3, 100, (2, 40))
    with torch.no_grad():
        want = tuned(input_ids=ids).logits
        model, _ = patchattn.load("tiny-llama", adapter=str(tmp_path / "run"))
        assert torch.equal(model(input_ids=ids).logits, want)
        reloaded = {n: p for n, p in model.named_parameters() if ".patchattn." in n}
    assert len(reloaded) == len(learned)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_triton_inference_path_matches_the_torch_path(triton_target, dtype, tol):
    (q, k, v), weight, a = _inputs(dtype, tq=70, tk=70)
    q, k, v, weight, a = (t.detach().to(triton_target) for t in (q, k, v, weight, a))
    outs = {}
    for backend in ("torch", "triton"):
        state = _state(20, 16, weight, a)
        state.config.backend = backend
        with torch.no_grad():
            outs[backend] = dma.dynamic_mask_attention(state, q, k, v, 0.25, None)
    assert max_abs_diff(outs["torch"], outs["triton"]) <= tol
