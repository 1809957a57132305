"""patchattn.bounded_cache for linear layers (lightning, hybrid): a recurrent state per linear layer instead of its
keys, tokens equal to the default (full) cache."""

import warnings

import pytest
import torch
from transformers import DynamicCache, DynamicLayer

import patchattn
from patchattn.adapters.kv_cache import LinearStateLayer
from patchattn.testing import left_pad, tiny_model

SMALL = {"block_size": 16, "backend": "torch"}
CASES = {
    "lightning": ("lightning", SMALL),
    "lightning_rms_silu": ("lightning", {**SMALL, "feature_map": "silu", "normalize": "rms"}),
    "hybrid": ("hybrid", {**SMALL, "softmax_every": 2}),  # tiny llama: layer 0 linear, layer 1 softmax
}
PROMPT, NEW = 60, 8


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # generate's notices
        yield


def _inputs(batch: int) -> dict:
    ids = torch.randint(3, 100, (batch, PROMPT), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids} if batch == 1 else left_pad({"input_ids": ids}, [0, 9][:batch])


def _generate(model, inputs, **kwargs):
    return model.generate(**inputs, max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None,
                          **kwargs)


def _perturbed(model):
    """Trained-looking conversion parameters (identity feature maps and a gate of exactly 1 hide mistakes)."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".patchattn." in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("batch", [1, 2], ids=["batch1", "padded2"])
@pytest.mark.parametrize("case", list(CASES))
def test_bounded_cache_generates_the_default_caches_tokens_and_holds_a_state(case, batch):
    method, options = CASES[case]
    model = tiny_model("llama")
    inputs = _inputs(batch)
    with torch.no_grad(), patchattn.patched(model, method, **options):
        _perturbed(model)
        full = DynamicCache()
        expected = _generate(model, inputs, past_key_values=full)
        cache = patchattn.bounded_cache(model)
        got = _generate(model, inputs, past_key_values=cache)
    assert torch.equal(got, expected)
    assert cache.get_seq_length() == PROMPT + NEW - 1
    linear = [layer for layer in cache.layers if isinstance(layer, LinearStateLayer)]
    softmax = [layer for layer in cache.layers if isinstance(layer, DynamicLayer)]
    assert len(linear) == (1 if method == "hybrid" else model.config.num_hidden_layers)
    assert len(softmax) == (1 if method == "hybrid" else 0)
    assert all(layer.kv is not None and layer.slots() == 0 for layer in linear)  # no keys: the state alone
    assert all(layer.keys.shape[2] == PROMPT + NEW - 1 for layer in softmax)  # hybrid's softmax layer: every key


def test_linear_layers_memory_does_not_grow_with_the_context():
    """The cache bytes of the bounded vs the default cache: a linear layer holds its fixed-size state."""
    model = tiny_model("llama")
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    # hedgehog: 2 D features per query head; 'sum': D value columns + 1 for the denominator; float32
    state_bytes = 2 * config.num_attention_heads * (2 * head_dim) * (head_dim + 1) * 4
    with torch.no_grad(), patchattn.patched(model, "lightning", **SMALL):
        sizes = {}
        for length in (40, 400):
            ids = torch.randint(3, 100, (2, length), generator=torch.Generator().manual_seed(2))
            bounded, full = patchattn.bounded_cache(model), DynamicCache()
            for cache in (bounded, full):
                model(input_ids=ids, past_key_values=cache)
                model(input_ids=ids[:, :1], past_key_values=cache)  # a decode step
            full_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in full.layers)
            sizes[length] = (bounded.nbytes(), full_bytes)
            assert bounded.slots() == [0] * config.num_hidden_layers
    print(f"cache bytes (bounded, default) by context length: {sizes}")
    assert sizes[40][0] == sizes[400][0] == config.num_hidden_layers * state_bytes
    per_token = 2 * 2 * config.num_key_value_heads * head_dim * 4 * config.num_hidden_layers  # batch 2, k + v
    assert sizes[40][1] == 41 * per_token and sizes[400][1] == 401 * per_token
    assert sizes[400][0] < sizes[400][1] / 10


def test_beam_search_reorders_the_state():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), patchattn.patched(model, "hybrid", **SMALL, softmax_every=2):
        _perturbed(model)
        kwargs = {"max_new_tokens": 6, "num_beams": 3, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
        expected = model.generate(input_ids=ids, **kwargs)
        got = model.generate(input_ids=ids, past_key_values=patchattn.bounded_cache(model), **kwargs)
    assert torch.equal(got, expected)


def test_what_a_linear_bounded_cache_refuses():
    model = tiny_model("llama")
    with patchattn.patched(model, "lightning", **SMALL):
        with pytest.raises(ValueError, match="static=False"):
            patchattn.bounded_cache(model, static=True)
        cache = patchattn.bounded_cache(model)
        with pytest.raises(NotImplementedError, match="cropped"):
            cache.crop(3)


def test_a_forward_without_the_cache_after_it_uses_no_stale_state():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 50), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), patchattn.patched(model, "lightning", **SMALL):
        expected = model(input_ids=ids).logits
        cache = patchattn.bounded_cache(model)
        model(input_ids=ids, past_key_values=cache)
        model(input_ids=ids[:, :1], past_key_values=cache)
        torch.testing.assert_close(model(input_ids=ids).logits, expected)


@pytest.mark.parametrize("family", ["qwen3", "phi3"])
def test_other_families_generate_the_default_caches_tokens(family):
    model = tiny_model(family)
    with torch.no_grad(), patchattn.patched(model, "lightning", **SMALL):
        _perturbed(model)
        expected = _generate(model, _inputs(2), past_key_values=DynamicCache())
        got = _generate(model, _inputs(2), past_key_values=patchattn.bounded_cache(model))
    assert torch.equal(got, expected)


def test_sliding_window_layer_types_are_refused():
    model = tiny_model("gemma2")
    with patchattn.patched(model, "lightning", **SMALL), pytest.raises(ValueError, match="sliding-window"):
        patchattn.bounded_cache(model)
