"""Every transformers family: the control method changes nothing, and patch/unpatch/save/load are exact."""

import pytest
import torch

import patchattn
from patchattn.testing import LLM_FAMILIES, LVLM_FAMILIES, left_pad, max_abs_diff, tiny_inputs, tiny_model

ALL_FAMILIES = LLM_FAMILIES + LVLM_FAMILIES
TOL = 1e-5


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _impls(model):
    from patchattn.adapters.hf import _all_configs

    return [c._attn_implementation_internal for c in _all_configs(model.config)]


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_dense_matches_unpatched_and_unpatch_restores(family, probe_calls):
    model = tiny_model(family)
    inputs = tiny_inputs(model, family)
    with torch.no_grad():
        reference = model(**inputs).logits
    weights, impls = _snapshot(model), _impls(model)

    handle = patchattn.patch(model, "dense")
    assert handle.method == "dense" and handle.modules
    assert all(model.get_submodule(name).patchattn.config is handle.config for name in handle.modules)
    with torch.no_grad():
        patched = model(**inputs).logits
    assert max_abs_diff(patched, reference) <= TOL

    # The probe proves the attention really goes through the registry (not a silent fallback).
    patchattn.patch(model, "test_probe")
    with torch.no_grad():
        model(**inputs)
    assert probe_calls["text"] == len(patchattn.get_handle(model).modules)

    patchattn.unpatch(model)
    with torch.no_grad():
        restored = model(**inputs).logits
    assert torch.equal(restored, reference)
    assert _impls(model) == impls
    after = model.state_dict()
    assert after.keys() == weights.keys() and all(torch.equal(after[k], weights[k]) for k in weights)
    assert not any(hasattr(m, "patchattn") for m in model.modules())


@pytest.mark.parametrize("family", LVLM_FAMILIES)
@pytest.mark.parametrize("targets", ["text", "vision", "all"])
def test_lvlm_targets(family, targets, probe_calls):
    model = tiny_model(family)
    inputs = tiny_inputs(model, family)
    with torch.no_grad():
        reference = model(**inputs).logits
    handle = patchattn.patch(model, "test_probe", targets=targets)
    with torch.no_grad():
        out = model(**inputs).logits
    assert max_abs_diff(out, reference) <= TOL
    roles = {model.get_submodule(n).patchattn.role for n in handle.modules}
    assert roles == {"text": {"text"}, "vision": {"vision"}, "all": {"text", "vision"}}[targets]
    assert (probe_calls["vision"] > 0) == (targets != "text")
    assert (probe_calls["text"] > 0) == (targets != "vision")
    # The image-token span reaches the methods through the shared context.
    layout = model.get_submodule(handle.modules[0]).patchattn.context.layout
    expected = inputs["input_ids"] == model.config.image_token_id
    assert torch.equal(layout.image_token_mask, expected)
    patchattn.unpatch(model)


def test_vision_target_on_llm_is_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="vision"):
        patchattn.patch(model, "dense", targets="vision")
    with pytest.raises(ValueError, match="targets must be one of"):
        patchattn.patch(model, "dense", targets="decoder")


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_greedy_generation_with_cache_is_identical(family, probe_calls):
    model = tiny_model(family)
    inputs = tiny_inputs(model, family, batch=1)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    reference = model.generate(**inputs, **settings)
    with patchattn.patched(model, "test_probe"):
        tokens = model.generate(**inputs, **settings)
    assert torch.equal(tokens, reference)
    assert probe_calls["query_len", 1] > 0, "decode steps (one query against the KV cache) must go through the patch"


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_left_padded_batch(family):
    model = tiny_model(family)
    inputs = left_pad(tiny_inputs(model, family, text_len=14), [0, 3])
    with torch.no_grad():
        reference = model(**inputs).logits
        with patchattn.patched(model, "dense"):
            patched = model(**inputs).logits
    valid = inputs["attention_mask"].bool()
    assert max_abs_diff(patched[valid], reference[valid]) <= TOL


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen2_vl", "gemma3"])
def test_save_load_keeps_the_patch(family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    model = tiny_model(family)
    inputs = tiny_inputs(model, family)
    with torch.no_grad():
        reference = model(**inputs).logits
    patchattn.patch(model, "dense", backend="torch")
    model.save_pretrained(tmp_path)
    patchattn.unpatch(model)

    auto = AutoModelForImageTextToText if family in LVLM_FAMILIES else AutoModelForCausalLM
    loaded = auto.from_pretrained(tmp_path).eval()
    assert loaded.config.get_text_config()._attn_implementation == "patchattn_dense"
    with torch.no_grad():
        out = loaded(**inputs).logits
    assert max_abs_diff(out, reference) <= TOL
    states = [m.patchattn for m in loaded.modules() if hasattr(m, "patchattn")]
    assert states and all(s.config == patchattn.get_config("dense", backend="torch") for s in states)

    # An explicit patch of the loaded model works and unpatch returns it to plain SDPA/eager.
    patchattn.patch(loaded, "dense")
    patchattn.unpatch(loaded)
    assert not loaded.config.get_text_config()._attn_implementation.startswith("patchattn_")


def test_attn_implementation_at_load_uses_default_config(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("qwen3")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="patchattn_dense")
    ids = torch.randint(3, 100, (1, 9))
    with torch.no_grad():
        assert max_abs_diff(loaded(input_ids=ids).logits, model(input_ids=ids).logits) <= TOL
    assert loaded.model.layers[0].self_attn.patchattn.config == patchattn.get_config("dense")
