"""``vhr``: the fused last-row selection against full eager attention, on tiny LLaVA, Qwen2-VL and Gemma 3."""

import copy

import numpy as np
import pytest
import torch
from lvlm_cases import FAMILIES, Oracle, image_mask, oracle_model, padded_inputs

import patchattn
from patchattn.methods import vhr
from patchattn.testing import max_abs_diff, tiny_inputs, tiny_model

TOL = 2e-5
SETTINGS = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}


def _text_states(model, handle):
    return [model.get_submodule(n).patchattn for n in handle.modules if model.get_submodule(n).patchattn.role == "text"]


# ---- the selection, on random q/k/v ------------------------------------------------------------------------------
def test_selection_matches_the_eager_last_row_with_gqa_and_padding():
    torch.manual_seed(1)
    batch, heads, kv_heads, length, dim = 3, 8, 2, 11, 16
    q = torch.randn(batch, heads, length, dim, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, length, dim, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, length, dim, dtype=torch.float64)
    starts = torch.tensor([0, 2, 4])
    keys = torch.arange(length)
    mask = (keys[None, None, :] <= keys[None, :, None]) & (keys[None, None, :] >= starts[:, None, None])
    mask = mask[:, None]
    image = torch.zeros(batch, length, dtype=torch.bool)
    image[0, 1:6], image[1, 3:7], image[2, 5:8] = True, True, True
    chosen, vhd = vhr.choose_heads(q, k, v, mask, image, scaling=dim**-0.5)

    oracle = Oracle("vhr", layers={0}, alpha=2.0)
    oracle.image = image
    from lvlm_cases import full_probs

    probs = full_probs(None, q, k, mask, dim**-0.5)
    oracle.choose(0, probs[:, :, -1], v.repeat_interleave(heads // kv_heads, 1))
    assert torch.allclose(vhd, oracle.vhd[0], atol=1e-10)
    assert torch.equal(chosen, oracle.heads[0])
    assert chosen.sum(-1).tolist() == [heads // 2] * batch  # the top half, with no ties


def test_outliers_are_dropped_before_the_median():
    with_image = torch.zeros(1, 6, 2, dtype=torch.float64)
    without = torch.zeros(1, 6, 2, dtype=torch.float64)
    with_image[0, :, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 40.0])
    without[0, 5, 1] = 30.0  # head 5 surges without the image: an outlier in both VHD and TA
    vhd = vhr.head_divergence(with_image, without)
    assert vhd[0, 5] == 0
    assert vhr.select_heads(vhd).tolist() == [[False, False, True, True, True, False]]  # above 2.5
    # no image anywhere: every divergence is 0 and no head is chosen
    assert not vhr.select_heads(torch.zeros(2, 4)).any()


# ---- whole models against the eager oracle ----------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rows", ["all", "generated"])
def test_model_matches_the_eager_oracle_prefill_and_decode(family, rows):
    model = tiny_model(family)
    inputs = padded_inputs(model, family)
    oracle = Oracle("vhr", layers={0, 1, 2}, alpha=2.0, rows=rows)
    reference = oracle_model(family, oracle, f"vhr_oracle_{family}_{rows}")
    oracle.image = image_mask(model, inputs)
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        expected = reference(**inputs).logits
        dense = model(**inputs).logits
        handle = patchattn.patch(model, "vhr", rows=rows)
        got = model(**inputs).logits
    states = _text_states(model, handle)
    for state in states:
        assert torch.equal(state.method_state.heads, oracle.heads[state.layer_index]), state.layer_index
    assert any(s.method_state.heads.any() for s in states)
    assert max_abs_diff(got[valid], expected[valid]) <= TOL
    assert max_abs_diff(got[valid], dense[valid]) > 1e-3  # the heads really changed the model
    if rows == "generated":  # prompt rows before the last are the dense model's, exactly
        assert torch.equal(got[:, :-1], dense[:, :-1])
    chosen = [s.method_state.heads.clone() for s in states]
    settings = dict(SETTINGS, output_scores=True, return_dict_in_generate=True)
    tokens, expected_tokens = model.generate(**inputs, **settings), reference.generate(**inputs, **settings)
    assert torch.equal(tokens.sequences, expected_tokens.sequences)
    assert max(max_abs_diff(a, b) for a, b in zip(tokens.scores, expected_tokens.scores)) <= TOL
    # decode steps kept the prefill's choice (the oracle also reused its own)
    assert all(torch.equal(s.method_state.heads, c) for s, c in zip(states, chosen))
    patchattn.unpatch(model)


def test_decode_steps_reuse_the_heads_of_the_prefill():
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava", batch=1)
    handle = patchattn.patch(model, "vhr")
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        state = _text_states(model, handle)[1]
        chosen = state.method_state.heads.clone()
        step = torch.tensor([[5]])
        mask = torch.ones(1, inputs["input_ids"].shape[1] + 1, dtype=torch.long)

        def decode():
            cache = copy.deepcopy(out.past_key_values)
            return model(input_ids=step, past_key_values=cache, attention_mask=mask).logits

        kept = decode()
        assert torch.equal(state.method_state.heads, chosen)  # the step did not select again
        state.method_state.heads = ~chosen  # a decode step uses what the state holds
        assert max_abs_diff(decode(), kept) > 1e-4
        assert torch.equal(state.method_state.heads, ~chosen)
    patchattn.unpatch(model)


def test_batch_rows_choose_as_if_alone():
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava", batch=2)
    handle = patchattn.patch(model, "vhr")
    with torch.no_grad():
        together = model(**inputs).logits
        heads = [s.method_state.heads.clone() for s in _text_states(model, handle)]
        for row in range(2):
            alone = {k: v[row:row + 1] for k, v in inputs.items()}
            assert max_abs_diff(model(**alone).logits, together[row:row + 1]) <= TOL
            for state, both in zip(_text_states(model, handle), heads):
                assert torch.equal(state.method_state.heads[0], both[row])
    patchattn.unpatch(model)


# ---- dense equivalence, no image, unpatch, targets, layers --------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_alpha_one_is_dense_exactly(family):
    model = tiny_model(family)
    inputs = padded_inputs(model, family)
    with torch.no_grad():
        reference = model(**inputs).logits
        with patchattn.patched(model, "vhr", alpha=1.0):
            assert torch.equal(model(**inputs).logits, reference)


def test_text_only_input_is_dense_and_unpatch_restores_exactly():
    model = tiny_model("llava")
    text = tiny_inputs(model, "llava", with_image=False)
    inputs = tiny_inputs(model, "llava")
    with torch.no_grad():
        reference_text, reference = model(**text).logits, model(**inputs).logits
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        patchattn.patch(model, "vhr")
        assert torch.equal(model(**text).logits, reference_text)
        model.generate(**inputs, **SETTINGS)
        patchattn.unpatch(model)
        assert torch.equal(model(**inputs).logits, reference)
    assert not any(hasattr(m, "patchattn") for m in model.modules())
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_targets_vision_is_refused_and_the_vision_tower_is_untouched():
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava")
    vision = model.model.vision_tower
    with torch.no_grad():
        reference = vision(pixel_values=inputs["pixel_values"]).last_hidden_state
        with patchattn.patched(model, "vhr"):
            assert torch.equal(vision(pixel_values=inputs["pixel_values"]).last_hidden_state, reference)
        with patchattn.patched(model, "vhr", targets="vision"), pytest.raises(NotImplementedError, match="vhr"):
            model(**inputs)


def test_layers_follow_the_config():
    model = tiny_model("llava")
    handle = patchattn.patch(model, "vhr", last_layers=1)
    assert [s.method_state.active for s in _text_states(model, handle)] == [False, True]
    patchattn.unpatch(model)
    handle = patchattn.patch(model, "vhr", layers=[0])
    assert [s.method_state.active for s in _text_states(model, handle)] == [True, False]
    patchattn.unpatch(model)
    with pytest.raises(ValueError, match="layer"):
        patchattn.patch(model, "vhr", layers=[5])
    with pytest.raises(ValueError, match="lvlm"):
        patchattn.patch(tiny_model("llama"), "vhr")
    assert np.isclose(vhr.VHRConfig().alpha, 2.0) and vhr.VHRConfig().last_layers == 14


# ---- the attention function on random tensors against the method file's eager reference ------------------------------
def _tensors(batch=2, heads=4, kv_heads=2, length=12, dim=8, seed=4):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, h, length, dim, generator=gen, dtype=torch.float64) for h in (heads, kv_heads, kv_heads)]


def test_the_attention_function_matches_its_reference_prefill_then_decode():
    from patchattn.state import PatchContext, PatchState

    q, k, v = _tensors()
    image = torch.zeros(2, 12, dtype=torch.bool)
    image[0, 2:6], image[1, 4:9] = True, True
    starts = torch.tensor([0, 3])
    keys = torch.arange(12)
    allowed = ((keys[None, :] <= keys[:, None])[None] & (keys >= starts[:, None, None]))[:, None]
    context = PatchContext(family="llava", kind="lvlm")
    context.layout.image_token_mask = image[:, :10]  # the prompt: 10 tokens, then two decode steps
    config = patchattn.get_config("vhr")
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    module.patchattn = PatchState(config, 0, "text", context, vhr.VHRState(active=True))
    out, _ = vhr.vhr_attention(module, q[:, :, :10], k[:, :, :10], v[:, :, :10], allowed[:, :, :10, :10])
    expected, heads = vhr.vhr_reference(q[:, :, :10], k[:, :, :10], v[:, :, :10], image[:, :10], alpha=2.0,
                                        allowed=allowed[:, :, :10, :10])
    valid = (torch.arange(10)[None] >= starts[:, None])[:, :, None, None]
    assert torch.equal(module.patchattn.method_state.heads, heads)
    assert max_abs_diff((out * valid), (expected.transpose(1, 2) * valid)) <= 1e-12
    for t in (10, 11):  # decode steps: one query, the kept heads
        step, _ = vhr.vhr_attention(module, q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1],
                                    allowed[:, :, t:t + 1, :t + 1])
        ref, _ = vhr.vhr_reference(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], image, alpha=2.0,
                                   allowed=allowed[:, :, t:t + 1, :t + 1], heads=heads)
        assert max_abs_diff(step, ref.transpose(1, 2)) <= 1e-12


@pytest.mark.parametrize("heads", [1, 2, 5, 8, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_median_from_one_sort_is_torch_quantile(heads, dtype):
    torch.manual_seed(heads)
    vhd = torch.randn(64, heads, dtype=dtype).abs()
    vhd[::3, : heads // 2] = 0.0  # ties and rows of outliers set to 0
    vhd[::5] = vhd[::5].round(decimals=1)  # more ties
    vhd[7] = 0.0  # no image: selects none
    assert torch.equal(vhr.select_heads(vhd), vhd > vhd.quantile(0.5, dim=-1, keepdim=True))
