"""patchattn.bounded_cache: KV memory bounded by what the method reads, tokens equal to the masked path's."""

import math
import warnings

import pytest
import torch
from transformers import DynamicCache

import patchattn
from patchattn.adapters.kv_cache import BoundedLayer
from patchattn.testing import left_pad, tiny_model

SMALL = {"block_size": 16, "backend": "torch"}
CASES = {
    "streaming": ("streaming", {**SMALL, "window": 32, "sink_tokens": 4}),
    "streaming_dense_layer": ("streaming", {**SMALL, "window": 20, "sink_tokens": 20, "dense_layers": [0]}),
    "duo": ("duo", {**SMALL, "window": 32, "sink_tokens": 4, "retrieval_fraction": 0.25}),
    "duo_per_query_head": ("duo", {**SMALL, "window": 32, "retrieval_fraction": 0.25, "kv_heads_together": False}),
    "sinklora_h2o": ("sinklora", {"backend": "torch", "kv_budget": 48}),
}
PROMPT, NEW = 200, 10
PADS = [0, 7, 37]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duo's uncalibrated heads, generate's notices
        yield


def _inputs(batch: int) -> dict:
    ids = torch.randint(3, 100, (batch, PROMPT), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids} if batch == 1 else left_pad({"input_ids": ids}, PADS[:batch])


def _generate(model, inputs, **kwargs):
    return model.generate(**inputs, max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None,
                          **kwargs)


def _bounded_layers(cache):
    return [layer for layer in cache.layers if isinstance(layer, BoundedLayer)]


@pytest.mark.parametrize("batch", [1, 3], ids=["batch1", "padded3"])
@pytest.mark.parametrize("case", list(CASES))
def test_bounded_cache_generates_the_masked_paths_tokens_and_frees_keys(case, batch):
    method, options = CASES[case]
    model = tiny_model("llama")
    inputs = _inputs(batch)
    with torch.no_grad(), patchattn.patched(model, method, **options):
        masked = _generate(model, inputs)
        cache = patchattn.bounded_cache(model)
        bounded = _generate(model, inputs, past_key_values=cache)
    assert torch.equal(bounded, masked)
    assert cache.get_seq_length() == PROMPT + NEW - 1  # positions keep counting every token
    # Something was freed: every bounded layer holds fewer keys than the prompt has, over its KV heads.
    layers = _bounded_layers(cache)
    assert layers and all(layer.held() < model.config.num_key_value_heads * PROMPT for layer in layers)


def test_streaming_memory_is_sink_and_window_blocks_not_the_prompt():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 700), generator=torch.Generator().manual_seed(2))
    sink_tokens, window, block = 4, 48, 16
    with torch.no_grad(), patchattn.patched(model, "streaming", **SMALL, window=window, sink_tokens=sink_tokens):
        cache = patchattn.bounded_cache(model)
        model(input_ids=ids, past_key_values=cache)
        after_prompt = cache.slots()
        for _ in range(20):  # decode steps: the window moves, the memory does not grow
            model(input_ids=ids[:, :1], past_key_values=cache)
            assert max(cache.slots()) <= math.ceil(sink_tokens / block) * block + window + 2 * block
    bound = math.ceil(sink_tokens / block) * block + window + 2 * block  # sinks + window + its two block edges
    assert all(slots <= bound for slots in after_prompt), after_prompt
    per_token = 2 * model.config.num_key_value_heads * model.config.head_dim * 4  # keys + values, fp32
    assert cache.nbytes() <= model.config.num_hidden_layers * bound * per_token
    dense = DynamicCache()
    with torch.no_grad(), patchattn.patched(model, "streaming", **SMALL, window=window, sink_tokens=sink_tokens):
        model(input_ids=ids, past_key_values=dense)
    dense_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in dense.layers)
    assert dense_bytes == model.config.num_hidden_layers * 700 * per_token and cache.nbytes() < dense_bytes / 5


def test_duo_keeps_retrieval_heads_whole_and_bounds_the_streaming_heads():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 400), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), patchattn.patched(model, "duo", **SMALL, window=32, sink_tokens=4, retrieval_fraction=0.25):
        cache = patchattn.bounded_cache(model)
        model(input_ids=ids, past_key_values=cache)
    groups = [(len(g.kv_heads), g.keys.shape[2]) for layer in _bounded_layers(cache) for g in layer.groups]
    assert (1, 400) in groups  # a retrieval KV head keeps the whole prompt
    streaming = [slots for heads, slots in groups if slots < 400]
    assert streaming and all(slots <= 16 + 32 + 32 for slots in streaming)


@pytest.mark.parametrize("kv_heads_together", [True, False])
def test_duo_prefill_decides_what_to_keep_without_a_query_by_slot_mask(monkeypatch, kv_heads_together):
    """The prefill of a bounded cache only says which slots to keep: building the [Tq, S] visibility there cost two
    17 GB masks per layer at 128k (the H200's 105.6 GiB peak)."""
    import patchattn.methods.duo as duo

    shapes = []
    for name in ("causal_slots", "sink_window_visible"):
        real = getattr(duo, name)

        def recording(query_positions, *args, _real=real, **kwargs):
            shapes.append(tuple(query_positions.shape))
            return _real(query_positions, *args, **kwargs)

        monkeypatch.setattr(duo, name, recording)
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 300), generator=torch.Generator().manual_seed(3))
    settings = dict(SMALL, window=32, sink_tokens=4, retrieval_fraction=0.25, kv_heads_together=kv_heads_together)
    with torch.no_grad(), patchattn.patched(model, "duo", **settings):
        cache = patchattn.bounded_cache(model)
        model(input_ids=ids, past_key_values=cache)  # the prefill
        assert not any(q_len > 1 for _, q_len in shapes), shapes
        model(input_ids=ids[:, :1], past_key_values=cache)  # a decode step reads through the visibility
    assert shapes and all(q_len == 1 for _, q_len in shapes)


def test_h2o_holds_kv_budget_keys_per_head():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 300), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), patchattn.patched(model, "sinklora", backend="torch", kv_budget=40):
        cache = patchattn.bounded_cache(model)
        model(input_ids=ids, past_key_values=cache)
        for _ in range(5):
            model(input_ids=ids[:, :1], past_key_values=cache)
            assert cache.slots() == [40, 40]  # the budget (+1 for the new token, evicted at once)
    for layer in _bounded_layers(cache):
        assert bool((layer.groups[0].positions >= 0).all())  # each head's 40 slots hold kept keys


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_a_multi_token_call_on_an_evicted_cache_equals_the_masked_path(static):
    """A second chunk (queries not one block: aligned to the chunk's start, as the masked path does)."""
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 260), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), patchattn.patched(model, "streaming", **SMALL, window=32, sink_tokens=4):
        dynamic, bounded = DynamicCache(), patchattn.bounded_cache(model, static=static)
        for cache in (dynamic, bounded):
            model(input_ids=ids[:, :150], past_key_values=cache)
        expected = model(input_ids=ids[:, 150:], past_key_values=dynamic).logits
        got = model(input_ids=ids[:, 150:], past_key_values=bounded).logits
    assert max(bounded.slots()) < 150
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_methods_that_cannot_bound_memory_say_which_can():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="not patched"):
        patchattn.bounded_cache(model)
    with patchattn.patched(model, "blocktopk", **SMALL), pytest.raises(ValueError) as err:
        patchattn.bounded_cache(model)
    assert "'blocktopk'" in str(err.value) and "duo, hybrid, lightning, sinklora, streaming" in str(err.value)
    with patchattn.patched(model, "streaming", **SMALL, density=0.3), pytest.raises(ValueError, match="window"):
        patchattn.bounded_cache(model)
    with patchattn.patched(model, "sinklora", backend="torch"), pytest.raises(ValueError, match="kv_budget"):
        patchattn.bounded_cache(model)


def test_a_cache_made_for_another_patch_refuses_to_run():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 40), generator=torch.Generator().manual_seed(6))
    patchattn.patch(model, "streaming", **SMALL, window=32)
    cache = patchattn.bounded_cache(model)
    patchattn.patch(model, "streaming", **SMALL, window=64)
    with torch.no_grad(), pytest.raises(RuntimeError, match="re-patched"):
        model(input_ids=ids, past_key_values=cache)


def test_a_forward_without_the_cache_after_it_runs_the_masked_path():
    """The slots handed to a call are taken by it: nothing stale reaches a later call on the default cache."""
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 120), generator=torch.Generator().manual_seed(7))
    with torch.no_grad(), patchattn.patched(model, "streaming", **SMALL, window=32):
        expected = model(input_ids=ids).logits
        model(input_ids=ids, past_key_values=patchattn.bounded_cache(model))
        torch.testing.assert_close(model(input_ids=ids).logits, expected)


# ---- the static variant: fixed-size slot buffers, a decode step that compiles whole ------------------------------
STREAMING = CASES["streaming"][1]


STATIC_CASES = {
    "streaming": ("streaming", STREAMING, {}),
    "duo": ("duo", CASES["duo"][1], {"max_cache_len": PROMPT + NEW}),
    "sinklora_h2o": ("sinklora", CASES["sinklora_h2o"][1], {}),
}
# A dense layer is transformers' StaticLayer beside the bounded ones (its compiled step reads the mask on the host in
# adapters/hf.causal_keys: eager here).
EAGER_STATIC_CASES = {**STATIC_CASES, "streaming_dense_layer": ("streaming", CASES["streaming_dense_layer"][1],
                                                                {"max_cache_len": PROMPT + NEW})}


@pytest.mark.parametrize("batch", [1, 3], ids=["batch1", "padded3"])
@pytest.mark.parametrize("case", list(EAGER_STATIC_CASES))
def test_static_bounded_cache_generates_the_masked_paths_tokens_in_fixed_buffers(case, batch):
    method, options, cache_options = EAGER_STATIC_CASES[case]
    model = tiny_model("llama")
    inputs = _inputs(batch)
    with torch.no_grad(), patchattn.patched(model, method, **options):
        masked = _generate(model, inputs)
        cache = patchattn.bounded_cache(model, static=True, **cache_options)
        static = _generate(model, inputs, past_key_values=cache)
    assert torch.equal(static, masked)
    assert cache.is_compileable and int(cache.get_seq_length()) == PROMPT + NEW - 1
    if method == "sinklora":
        bounded_capacity = options["kv_budget"] + 1  # the budget and the new token
    else:
        # sink blocks + window + its two block edges
        bounded_capacity = math.ceil(options["sink_tokens"] / 16) * 16 + options["window"] + 2 * 16
    for layer in _bounded_layers(cache):
        sizes = [buffer.keys.shape[2] for buffer in layer.buffers]
        assert bounded_capacity in sizes and all(size in (bounded_capacity, PROMPT + NEW + 1) for size in sizes)


@pytest.mark.parametrize("case", list(STATIC_CASES))
def test_static_bounded_decode_step_compiles_whole_inside_generate(case):
    """generate compiles the decode step (fullgraph=True) on a left-padded batch; same tokens, one graph."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    method, options, cache_options = STATIC_CASES[case]
    model = tiny_model("llama")
    inputs = _inputs(3)
    compile_config = CompileConfig(fullgraph=True, backend="eager", mode=None)
    compile_config._compile_all_devices = True  # generate compiles on GPUs only by default
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad(), patchattn.patched(model, method, **options):
        masked = _generate(model, inputs)
        cache = patchattn.bounded_cache(model, static=True, **cache_options)
        compiled = _generate(model, inputs, past_key_values=cache, compile_config=compile_config)
    assert torch.equal(compiled, masked)
    assert counters["stats"]["unique_graphs"] >= 1  # the step did run compiled (a break would have raised)
    torch._dynamo.reset()


def test_static_cache_needs_max_cache_len_for_whole_heads_and_h2o_one_token_per_call():
    model = tiny_model("llama")
    with patchattn.patched(model, "duo", **SMALL, window=32, retrieval_fraction=0.25), \
            pytest.raises(ValueError, match="max_cache_len"):
        patchattn.bounded_cache(model, static=True)
    with patchattn.patched(model, "streaming", **STREAMING, dense_layers=[0]), \
            pytest.raises(ValueError, match="layer 0 keeps every key"):
        patchattn.bounded_cache(model, static=True)
    ids = torch.randint(3, 100, (1, 60), generator=torch.Generator().manual_seed(8))
    with torch.no_grad(), patchattn.patched(model, "sinklora", backend="torch", kv_budget=40):
        cache = patchattn.bounded_cache(model, static=True)
        model(input_ids=ids, past_key_values=cache)
        with pytest.raises(NotImplementedError, match="one token per call"):
            model(input_ids=ids[:, :2], past_key_values=cache)


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
@pytest.mark.parametrize("method", ["streaming", "duo"])
def test_other_families_sliding_window_layers_and_soft_capping(family, method):
    """Gemma-2: sliding-window layers keep transformers' layers beside bounded ones, soft-capped logits."""
    options = CASES[method][1]
    model = tiny_model(family)
    inputs = _inputs(3)
    with torch.no_grad(), patchattn.patched(model, method, **options):
        masked = _generate(model, inputs)
        cache = patchattn.bounded_cache(model)
        bounded = _generate(model, inputs, past_key_values=cache)
    assert torch.equal(bounded, masked) and _bounded_layers(cache)


def test_rows_count_from_the_masks_first_real_token_when_no_position_ids_reach_the_cache():
    """Qwen2-VL passes no text positions to Cache.update: the prefill's mask gives each row's start."""
    from patchattn.testing import tiny_inputs

    model = tiny_model("qwen2_vl")
    inputs = left_pad(tiny_inputs(model, "qwen2_vl", batch=2, text_len=150), [0, 9])
    with torch.no_grad(), patchattn.patched(model, "streaming", **STREAMING):
        masked = _generate(model, inputs)
        cache = patchattn.bounded_cache(model)
        bounded = _generate(model, inputs, past_key_values=cache)
    assert torch.equal(bounded, masked)
    assert all(layer.start.tolist() == [0, 9] for layer in _bounded_layers(cache))


@pytest.mark.parametrize("case", ["streaming", "duo"])
def test_beam_search_reorders_the_slots_with_the_beams(case):
    method, options = CASES[case]
    model = tiny_model("llama")
    inputs = _inputs(2)
    with torch.no_grad(), patchattn.patched(model, method, **options):
        masked = _generate(model, inputs, num_beams=3)
        bounded = _generate(model, inputs, num_beams=3, past_key_values=patchattn.bounded_cache(model))
    assert torch.equal(bounded, masked)


def test_a_model_loaded_patched_gets_its_cache_after_get_handle(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    patchattn.patch(model, "streaming", **STREAMING)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with pytest.raises(ValueError, match="get_handle"):
        patchattn.bounded_cache(loaded)
    patchattn.get_handle(loaded)
    inputs = _inputs(1)
    with torch.no_grad():
        bounded = _generate(loaded, inputs, past_key_values=patchattn.bounded_cache(loaded))
        assert torch.equal(bounded, _generate(model, inputs))
