"""act: the fused (kernel + lse) path against the spec's eager A' computation, sinks frozen for decoding, the
sink mass dropping to beta, dense equivalence, head lists (dict, shipped, JSON) and clear errors."""

import json
import types
from pathlib import Path

import pytest
import torch
from op_counts import Allocations

import patchattn
from patchattn.calibrate import artifact, save_json
from patchattn.kernels.dense import sdpa_attention
from patchattn.methods import act
from patchattn.state import PatchContext, PatchState
from patchattn.testing import left_pad, max_abs_diff, tiny_model

SMOLLM2 = types.SimpleNamespace(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                                vocab_size=49152)


def _inputs(dtype=torch.float64, batch=2, heads=4, kv_heads=2, length=50, dim=16, seed=0):
    """Random q/k/v with two planted hidden sinks (keys 10 and 30 aligned with the mean query)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, length, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, length, dim, generator=gen, dtype=torch.float64)
    direction = q.mean((1, 2))[:, None]
    k[:, :, 10] += 2.5 * direction
    k[:, :, 30] += 2.0 * direction
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _state(**overrides):
    config = patchattn.get_config("act", **({"heads": {0: [1, 2]}, "threshold": 0.05, "chunk": 16} | overrides))
    return PatchState(config, 0, "text", PatchContext())


def _fused(state, q, k, v, heads, starts, requires_grad=False):
    group = q.shape[1] // k.shape[1]
    parts = [t.clone().requires_grad_(requires_grad) for t in (q[:, heads], k[:, heads // group], v[:, heads // group])]
    out, _ = act.calibrated_heads(state, *parts, q.shape[-1] ** -0.5, starts)
    return out, parts


def _valid(starts, length):
    return (torch.arange(length)[None] >= starts.long()[:, None])[:, None, :, None]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_path_matches_the_eager_spec_forward_and_gradients(dtype):
    q, k, v = _inputs(dtype)
    heads, starts = torch.tensor([1, 2]), torch.tensor([0, 7], dtype=torch.int32)
    state = _state()
    out, (qs, ks, vs) = _fused(state, q, k, v, heads, starts, requires_grad=True)
    assert state.method_state.sinks.sum() > 0, "the planted sinks must be found"
    ref_inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref, _, _ = act.act_reference(*ref_inputs, [1, 2], beta=0.4, threshold=0.05, starts=starts)
    valid = _valid(starts, q.shape[2])
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert max_abs_diff(out * valid, ref[:, heads] * valid) <= tol
    weight = torch.randn(out.shape, dtype=dtype) * valid
    (out * weight).sum().backward()
    (ref[:, heads] * weight).sum().backward()
    group = q.shape[1] // k.shape[1]
    assert max_abs_diff(qs.grad, ref_inputs[0].grad[:, heads]) <= tol * 10
    for mine, theirs in ((ks.grad, ref_inputs[1].grad), (vs.grad, ref_inputs[2].grad)):
        summed = torch.zeros_like(theirs).index_add_(1, heads // group, mine)
        assert max_abs_diff(summed, theirs) <= tol * 10


def test_sink_mass_drops_to_beta_rows_sum_to_one_and_the_first_sink_is_kept():
    q, k, v = _inputs()
    starts = torch.tensor([0, 7], dtype=torch.int32)
    _, before, after = act.act_reference(q, k, v, [1, 2], beta=0.4, threshold=0.05, starts=starts)
    valid = _valid(starts, q.shape[2])[..., 0]
    for h in (1, 2):
        scores = before[:, h].sum(1) / torch.arange(q.shape[2], 0, -1, dtype=q.dtype)
        sinks = act.sink_set(scores[:, None], 0.05, starts)[:, 0]
        first = (scores > 0.05) & (torch.arange(q.shape[2]) >= starts.long()[:, None])
        first_index = first.int().argmax(-1)
        assert not sinks[torch.arange(2), first_index].any(), "the first detected sink is never calibrated"
        assert sinks.sum() > 0
        mass_before = (before[:, h] * sinks[:, None]).sum(-1)
        mass_after = (after[:, h] * sinks[:, None]).sum(-1)
        torch.testing.assert_close(mass_after, 0.4 * mass_before, rtol=0, atol=1e-12)
        rows = after[:, h].sum(-1)
        torch.testing.assert_close(rows[valid[:, 0]], torch.ones_like(rows[valid[:, 0]]), rtol=0, atol=1e-12)
    untouched = [0, 3]
    assert torch.equal(after[:, untouched], before[:, untouched])


def test_decode_reuses_the_prefill_sinks():
    q, k, v = _inputs(length=41)
    heads, starts = torch.tensor([1, 2]), torch.tensor([0, 3], dtype=torch.int32)
    state = _state()
    _fused(state, q[:, :, :40], k[:, :, :40], v[:, :, :40], heads, starts)  # prefill: freezes the sinks
    frozen = state.method_state.sinks.clone()
    step, _ = _fused(state, q[:, :, 40:], k, v, heads, starts)  # one decode step against 41 keys
    sinks = torch.nn.functional.pad(frozen, (0, 1))
    ref, _, _ = act.act_reference(q[:, :, 40:], k, v, [1, 2], beta=0.4, threshold=0.05, starts=starts, sinks=sinks)
    assert max_abs_diff(step, ref[:, heads]) <= 1e-12
    assert torch.equal(state.method_state.sinks, frozen)


def _model_call(model, layer, beta=0.4, heads=None, **inputs):
    """(act output, dense output) of one layer's attention, with the model's real q/k/v and mask."""
    captured = {}

    def probe(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx == layer:
            captured.update(module=module, query=query, key=key, value=value, mask=attention_mask, kwargs=kwargs)
        return sdpa_attention(module, query, key, value, attention_mask, **kwargs)

    from patchattn.calibrate import attention_probe

    with attention_probe(model, "act_test_probe", probe), torch.no_grad():
        model(**inputs)
    c = captured
    with patchattn.patched(model, "act", heads=heads or {layer: [0, 2]}, beta=beta, threshold=0.05):
        out, _ = act.act_attention(c["module"], c["query"], c["key"], c["value"], c["mask"], **c["kwargs"])
    dense, _ = sdpa_attention(c["module"], c["query"], c["key"], c["value"], c["mask"], **c["kwargs"])
    return out, dense


def test_other_heads_are_exactly_dense_and_beta_one_is_dense():
    model = tiny_model("llama")  # 4 query heads, 2 kv heads
    inputs = left_pad({"input_ids": torch.randint(3, 100, (2, 40))}, [0, 6])
    out, dense = _model_call(model, 1, **inputs)
    assert torch.equal(out[:, :, [1, 3]], dense[:, :, [1, 3]])
    assert not torch.allclose(out[:, 6:, [0, 2]], dense[:, 6:, [0, 2]])
    out, dense = _model_call(model, 1, beta=1.0, **inputs)
    assert torch.equal(out, dense)
    reference = model(**inputs).logits
    with patchattn.patched(model, "act", heads={0: [0, 1], 1: [2]}, **act.ACTConfig.DENSE_EQUIVALENT):
        assert torch.equal(model(**inputs).logits, reference)


def test_generation_with_cache_and_padding_runs_and_differs_from_dense():
    model = tiny_model("llama")
    inputs = left_pad({"input_ids": torch.randint(3, 100, (2, 30))}, [0, 4])
    with torch.no_grad():
        dense = model(**inputs).logits
        with patchattn.patched(model, "act", heads={0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}, threshold=0.05):
            calibrated = model(**inputs).logits
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            assert model.model.layers[0].self_attn.patchattn.method_state.sinks.shape[:2] == (2, 4)
    assert out.shape == (2, 34)
    assert max_abs_diff(calibrated, dense) > 1e-4


def test_triton_kernel_path_matches_the_torch_path(triton_target):
    q, k, v = (t.to(triton_target) for t in _inputs(torch.float32, length=40))
    heads = torch.tensor([1, 2], device=triton_target)
    starts = torch.tensor([0, 5], dtype=torch.int32, device=triton_target)
    torch_out, _ = _fused(_state(backend="torch"), q, k, v, heads, starts)
    triton_out, _ = _fused(_state(backend="triton"), q, k, v, heads, starts)
    valid = _valid(starts.cpu(), q.shape[2]).to(triton_target)
    assert max_abs_diff(torch_out * valid, triton_out * valid) <= 1e-4


# ---- head lists and errors ---------------------------------------------------------------------------------------
def test_head_list_from_json_and_errors(tmp_path):
    model = tiny_model("llama")  # 2 layers x 4 heads
    rows = [[0, 1, 0, 0], [1, 0, 0, 1]]
    path = str(save_json(artifact("tiny", model.config, "act_heads", rows, {}), tmp_path / "heads.json"))
    with patchattn.patched(model, "act", heads=path):
        assert model.model.layers[1].self_attn.patchattn.method_state.heads.tolist() == [0, 3]
    bad = json.loads(Path(path).read_text())
    bad["act_heads"] = [[0, 2, 0, 0], [1, 0, 0, 1]]
    Path(path).write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="must be 0 or 1"):
        patchattn.get_config("act", heads=path)
    with pytest.raises(ValueError, match=r"must be <= 1"):
        patchattn.get_config("act", beta=1.5)
    with pytest.raises(ValueError, match=r"heads are ints in \[0, 3\]"):
        patchattn.patch(model, "act", heads={0: [4]})
    with pytest.raises(ValueError, match=r"layers are \[0, 1\]"):
        patchattn.patch(model, "act", heads={5: [0]})
    with pytest.raises(ValueError, match="shipped: .*smollm2_act"):
        patchattn.get_config("act", heads="no_such_list")


def test_auto_picks_the_shipped_smollm2_list_and_warns_elsewhere():
    config = patchattn.get_config("act")
    rows = [act.layer_heads(config, SMOLLM2, layer) for layer in range(30)]
    data = act.load_heads("smollm2_act")
    assert rows == [[h for h, on in enumerate(r) if on] for r in data["act_heads"]]
    assert not any(rows[0] + rows[1] + rows[29]), "candidate layers are 2..L-2"
    with pytest.warns(UserWarning, match="no calibrated ACT heads"):
        assert act.layer_heads(config, tiny_model("llama").config, 0) == []


def test_head_search_reruns_only_later_layers_and_matches_a_full_forward():
    from patchattn.calibrate.act import LayerCache, search, set_heads

    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(0)
    data = {"input_ids": torch.randint(3, 100, (6, 24), generator=gen), "attention_mask": torch.ones(6, 24).long(),
            "choices": torch.randint(3, 100, (6, 4), generator=gen), "answers": torch.randint(4, (6,), generator=gen)}
    with patchattn.patched(model, "act", heads={}, threshold=0.05):
        cache = LayerCache(model, data, batch_size=4)
        set_heads(model, {1: [2]})
        partial = cache.choice_logits(1)
        full = model(input_ids=data["input_ids"]).logits[:, -1]
        assert max_abs_diff(partial, full.gather(1, data["choices"])) <= 1e-5
        baseline, delta = search(model, cache, range(2), 4, log=lambda _text: None)
    assert 0.0 <= baseline <= 1.0 and len(delta) == 2 and all(d is not None for row in delta for d in row)


def test_bf16_inputs_match_the_fp64_spec_within_bf16_rounding():
    q, k, v = _inputs(torch.bfloat16)
    heads, starts = torch.tensor([1, 2]), torch.tensor([0, 7], dtype=torch.int32)
    out, _ = _fused(_state(), q, k, v, heads, starts)
    ref, _, _ = act.act_reference(q.double(), k.double(), v.double(), [1, 2], beta=0.4, threshold=0.05, starts=starts)
    valid = _valid(starts, q.shape[2])
    assert out.dtype == torch.bfloat16
    assert max_abs_diff(out.double() * valid, ref[:, heads] * valid) <= 3e-2


# ---- the fused prefill column scores (kernels.received.received_causal) -------------------------------------------
def _prefill_call(dtype, target, length=50):
    q, k, v = (t.to(target) for t in _inputs(dtype, length=length))
    heads = torch.tensor([1, 2], device=target)
    group = q.shape[1] // k.shape[1]
    q, k, v = q[:, heads], k[:, heads // group], v[:, heads // group]
    starts = torch.tensor([0, 7], dtype=torch.int32, device=target)
    _, lse = act.full_causal_attention(q, k, v, scaling=q.shape[-1] ** -0.5, kv_start=starts, backend="triton",
                                       return_lse=True)
    return q, k, lse, starts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_prefill_scores_match_the_torch_oracle_and_find_the_same_sinks(triton_target, dtype):
    """``prefill_scores`` on Triton (the interpreter here) against ``refine_and_score``: the refined lse and the
    causal column scores within fp32 rounding, and the same sink set (the case asserts no score is near the
    threshold)."""
    q, k, lse, starts = _prefill_call(dtype, triton_target)
    scale = q.shape[-1] ** -0.5
    config = _state(backend="triton").config
    got_lse, got = act.prefill_scores(q, k, lse, scale, starts, config)
    want_lse, want = act.refine_and_score(q, k, lse, scale, starts, config.chunk, columns=True)
    valid = _valid(starts.cpu(), q.shape[2])[..., 0].to(triton_target)
    assert torch.equal(torch.isfinite(got_lse), torch.isfinite(want_lse))
    assert (got_lse - want_lse)[valid.expand_as(got_lse)].abs().max() <= 1e-5
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert ((want - config.threshold).abs() > 1e-4).all(), "the case must not put a score within 1e-4 of the threshold"
    sinks = act.sink_set(got, config.threshold, starts)
    assert sinks.any() and torch.equal(sinks, act.sink_set(want, config.threshold, starts))


def test_the_fused_prefill_makes_no_score_sized_tensor(triton_interpreter):
    """On the Triton path the prefill's torch work is O(T) per head: no tensor of ``T x T`` (or ``chunk x T``) scores.
    Before note 63 ``refine_and_score`` made several ``[B, n, chunk, T]`` fp32 tensors per chunk (here chunk >= T:
    whole ``T x T`` matrices)."""
    q, k, v = _inputs(torch.float32, length=128, dim=16)
    heads, starts = torch.tensor([1, 2]), torch.tensor([0, 7], dtype=torch.int32)
    state = _state(backend="triton", chunk=4096, threshold=0.02)
    with Allocations() as seen:
        _fused(state, q, k, v, heads, starts)
    assert state.method_state.sinks.any()
    assert max(seen.sizes) < 128 * 128, f"a {max(seen.sizes)}-element tensor"


def test_model_outputs_and_sinks_match_between_the_fused_and_torch_prefill_scores(triton_target, monkeypatch):
    """A tiny Llama, left-padded, every head calibrated, attention on Triton in both runs: the prefill column scores
    from ``received_causal`` or from ``refine_and_score`` give the same sink sets (where no score is near the
    threshold) and logits within fp32 rounding, prefill and a decode step."""
    model = tiny_model("llama").to(triton_target)
    inputs = {k: t.to(triton_target) for k, t in left_pad({"input_ids": torch.randint(3, 100, (2, 40))},
                                                         [0, 6]).items()}
    layers = model.model.layers
    calls = {"fused": 0}
    fused = act.prefill_scores

    def counted(*args, **kwargs):
        calls["fused"] += 1
        return fused(*args, **kwargs)

    def oracle(q, k, lse, scale, starts, config, ends=None):
        return act.refine_and_score(q, k, lse, scale, starts, config.chunk, columns=True, ends=ends)

    runs = {}
    for name, scores in (("fused", counted), ("torch", oracle)):
        monkeypatch.setattr(act, "prefill_scores", scores)
        with torch.no_grad(), patchattn.patched(model, "act", heads={0: [0, 1, 2, 3], 1: [0, 1, 2, 3]},
                                                threshold=0.05, backend="triton"):
            logits = model(**inputs).logits
            sinks = [layer.self_attn.patchattn.method_state.sinks.clone() for layer in layers]
            runs[name] = logits, sinks
    assert calls["fused"] == len(layers)
    (fused_logits, fused_sinks), (torch_logits, torch_sinks) = runs["fused"], runs["torch"]
    assert any(s.any() for s in torch_sinks), "the case must find sinks"
    assert all(torch.equal(a, b) for a, b in zip(fused_sinks, torch_sinks))
    valid = inputs["attention_mask"].bool()
    assert max_abs_diff(fused_logits[valid], torch_logits[valid]) <= 1e-4
