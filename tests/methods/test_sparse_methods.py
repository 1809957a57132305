"""Block-sparse methods: dense in their degenerate setting, the patterns they promise, decode, padding, grads."""

import math

import pytest
import torch

import patchattn
from patchattn.eval import mean_stat
from patchattn.masks import BlockGeometry, causal_allowed, power_of_two, sink_and_window, strided_shards
from patchattn.testing import left_pad, max_abs_diff, tiny_model

SPARSE = [s.name for s in patchattn.list_methods("sparse")]
SMALL_BLOCKS = {"block_size": 16}
TOL = 1e-5


def _logits(model, **inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("method", SPARSE)
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "phi3"])
def test_degenerate_setting_reproduces_dense(method, family):
    model = tiny_model(family)
    ids = torch.randint(3, 100, (2, 150))
    reference = _logits(model, input_ids=ids)
    config = patchattn.get_config(method, **SMALL_BLOCKS)
    overrides = type(config).DENSE_EQUIVALENT
    assert overrides, f"{method} must declare the settings that make it dense"
    with patchattn.patched(model, config, **overrides):
        out = _logits(model, input_ids=ids)
        # Every layer the method handles reads every causal block (windowed layers report their window's share).
        kinds = getattr(model.config, "layer_types", None) or ["full_attention"] * len(model.model.layers)
        full = [float(layer.self_attn.patchattn.stats["density"])
                for layer, kind in zip(model.model.layers, kinds, strict=True) if kind != "sliding_attention"]
        assert full and full == pytest.approx([1.0] * len(full))
    assert max_abs_diff(out, reference) <= TOL


@pytest.mark.parametrize("method", SPARSE)
def test_default_sparse_setting_changes_output_and_reports_density(method):
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 256))
    reference = _logits(model, input_ids=ids)
    overrides = {"streaming": {"window": 32}, "s2": {"local_blocks": 2}, "blocktopk": {"top_k": 2},
                 "hip": {"top_k": 2, "dense_layers": []}, "duo": {"window": 32},
                 "hyper": {"min_seq_len": 0, "lsh_blocks": 2, "sample_size": 16}}.get(method, {})
    with patchattn.patched(model, method, **SMALL_BLOCKS, **overrides):
        out = _logits(model, input_ids=ids)
        used = mean_stat(model, "density")
    assert 0.0 < used < 1.0
    assert max_abs_diff(out, reference) > 1e-4, "a sparse pattern that reads fewer blocks must change something"
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("method", SPARSE)
def test_generation_with_kv_cache_matches_full_recompute(method):
    """Decode steps (one query against the cache) select the same blocks as a full forward would."""
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 70))
    with patchattn.patched(model, method, **SMALL_BLOCKS):
        generated = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        # Recompute each new token's logits without the cache: the last row must predict the same token.
        full = _logits(model, input_ids=generated[:, :-1])
    predicted = full[0, ids.shape[1] - 1:].argmax(-1)
    assert torch.equal(predicted, generated[0, ids.shape[1]:])


@pytest.mark.parametrize("method", SPARSE)
def test_left_padding_masks_padded_keys(method):
    model = tiny_model("llama")
    inputs = left_pad({"input_ids": torch.randint(3, 100, (2, 90))}, [0, 20])
    with patchattn.patched(model, method, **SMALL_BLOCKS, **type(patchattn.get_config(method)).DENSE_EQUIVALENT):
        out = _logits(model, **inputs)
    reference = _logits(model, **inputs)
    valid = inputs["attention_mask"].bool()
    assert max_abs_diff(out[valid], reference[valid]) <= TOL
    with patchattn.patched(model, method, **SMALL_BLOCKS):
        sparse = _logits(model, **inputs)
    assert torch.isfinite(sparse[valid]).all()


@pytest.mark.parametrize("method", SPARSE)
def test_gradients_flow_through_sparse_attention(method):
    model = tiny_model("llama").train()
    ids = torch.randint(3, 100, (1, 64))
    with patchattn.patched(model, method, **SMALL_BLOCKS):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    grad = model.model.layers[0].self_attn.q_proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_sliding_window_layers_stay_windowed():
    model = tiny_model("gemma3_text")
    ids = torch.randint(3, 100, (1, 120))
    reference = _logits(model, input_ids=ids)
    with pytest.warns(UserWarning, match="sliding-window layers keep their own window"):
        with patchattn.patched(model, "streaming", window=1 << 20, block_size=16):
            out = _logits(model, input_ids=ids)
            densities = {i: layer.self_attn.patchattn.stats["density"] for i, layer in enumerate(model.model.layers)}
    assert max_abs_diff(out, reference) <= TOL
    # A windowed layer reports what its window reads (not 1.0); the full layer reads every causal block here.
    window = model.config.sliding_window
    for i, kind in enumerate(model.config.layer_types):
        want = sum(min(n, window) for n in range(1, 121)) / sum(range(1, 121)) if kind == "sliding_attention" else 1.0
        assert float(densities[i]) == pytest.approx(want), (i, kind)
    assert "sliding_attention" in model.config.layer_types and window < 120


def test_sparse_methods_refuse_non_causal_attention():
    model = tiny_model("llava")
    from patchattn.testing import tiny_inputs

    inputs = tiny_inputs(model, "llava")
    patchattn.patch(model, "streaming", targets="vision")
    with pytest.raises(NotImplementedError, match="streaming.*causal-self.*needs .noncausal-self"):
        model(**inputs)


# ---- the patterns themselves --------------------------------------------------------------------------------
def _token_mask(block_mask, g: BlockGeometry):
    """Expand a [.., NQ, NK] block mask to tokens [.., Tq, Tk] (with causality)."""
    tokens = block_mask.repeat_interleave(g.block_q, -2).repeat_interleave(g.block_k, -1)[..., : g.q_len, : g.kv_len]
    rows = torch.arange(g.q_len)[:, None] + g.offset
    return tokens & (torch.arange(g.kv_len)[None, :] <= rows)


@pytest.mark.parametrize("q_len,kv_len", [(200, 200), (1, 200), (3, 131), (64, 64)])
def test_sink_and_window_covers_every_token_window(q_len, kv_len):
    g = BlockGeometry(q_len, kv_len, 16, 16)
    tokens = _token_mask(sink_and_window(g, sink_tokens=4, window=40), g)
    rows = torch.arange(q_len)[:, None] + g.offset
    keys = torch.arange(kv_len)[None, :]
    wanted = ((keys < 4) | (rows - keys < 40)) & (keys <= rows)
    assert (tokens | ~wanted).all(), "every sink and window token must be read"
    # ... and nothing beyond one block of slack on each side
    slack = ((keys < 16) | (rows - keys < 40 + 16 + 16)) & (keys <= rows)
    assert not (tokens & ~slack).any()


def test_power_of_two_distances_and_log_reachability():
    g = BlockGeometry(64 * 64, 64 * 64, 64, 64)
    mask = power_of_two(g, sink_blocks=1, local_blocks=1)
    row = mask[40].nonzero().flatten().tolist()
    assert row == sorted({0, 40, 39, 38, 36, 32, 24, 8})
    # Any block reaches any later one within ceil(log2 n) hops (sum of powers of two).
    reach = torch.eye(g.n_q, dtype=torch.bool)
    for _ in range(math.ceil(math.log2(g.n_q))):
        reach = reach | ((mask.float() @ reach.float()) > 0)
    assert reach[causal_allowed(g)].all()


def test_strided_shards_union_covers_context():
    g = BlockGeometry(1024, 1024, 16, 16)
    mask = strided_shards(g, heads=8, local_blocks=2, vert_stride=8)
    assert torch.equal(mask.any(0), causal_allowed(g))
    per_head = mask.float().sum(-1).mean(-1)
    assert (per_head < causal_allowed(g).float().sum(-1).mean() / 3).all()


def test_blocktopk_picks_the_block_the_query_matches():
    from patchattn.methods.blocktopk import select_top_k
    from patchattn.state import PatchContext, PatchState

    g = BlockGeometry(256, 256, 16, 16)
    key = torch.randn(1, 1, 256, 8) * 0.01
    query = torch.randn(1, 2, 256, 8) * 0.01
    key[:, :, 5 * 16: 6 * 16] = torch.ones(8)  # a block the queries all point at
    query[:] = query + torch.ones(8)
    state = PatchState(patchattn.get_config("blocktopk", top_k=1, local_blocks=1, sink_blocks=0, per_head=False,
                                            fused_select=False), 0, "text",
                       PatchContext())
    mask = select_top_k(g, query, key, state)
    assert mask.shape == (1, 1, g.n_q, g.n_k)
    assert mask[0, 0, 8:, 5].all(), "query blocks after block 5 must choose it"
    assert (mask[0, 0].sum(-1) <= 2).all()


def test_hip_tree_search_finds_the_true_top_blocks_on_separable_scores():
    from patchattn.kernels.blockselect import tree_search_torch as tree_search

    n_k, d = 64, 4
    k_means = torch.zeros(1, 1, n_k, d)
    targets = [3, 17, 33, 50]
    # Locality (the paper's premise): a high-scoring block has high-scoring neighbours.
    for t in targets:
        for j in range(n_k):
            k_means[0, 0, j, 0] += torch.exp(torch.tensor(-abs(j - t) / 4.0))
    q_rows = torch.zeros(1, 1, 1, 1, d)
    q_rows[..., 0] = 1.0
    chosen = tree_search(q_rows, k_means, torch.tensor([n_k - 1]), k=4)
    found = chosen[0, 0, 0].nonzero().flatten().tolist()
    assert len(found) == 4
    # A greedy tree search is approximate: each peak must be found to within one block.
    assert all(min(abs(f - t) for f in found) <= 1 for t in targets), found


def test_hip_max_row_score_finds_a_needle_that_the_mean_query_blurs():
    from patchattn.kernels.blockselect import tree_search_torch as tree_search
    from patchattn.methods.hip import query_rows

    n_k, d, needle = 64, 4, 41
    k_means = torch.zeros(1, 1, n_k, d)
    k_means[..., 0] = 1.0  # repetitive filler: every block looks alike to the "local" row
    # A run of blocks only the "needle" row wants (locality, the tree search's premise).
    k_means[0, 0, needle - 4 : needle + 4] = torch.tensor([-3.0, 3.0, 0.0, 0.0])
    query = torch.zeros(1, 1, 2, d)
    query[0, 0, 0, 0] = 1.0  # a row reading the filler
    query[0, 0, 1, 1] = 1.0  # a row looking for the needle
    found = {}
    for score in ("max", "mean"):
        rows = query_rows(query, block=2, kv_heads=1, per_head=True, score=score)
        chosen = tree_search(rows, k_means, torch.tensor([n_k - 1]), k=2)[0, 0, 0]
        found[score] = bool(chosen[needle - 4 : needle + 4].any())
    assert found == {"max": True, "mean": False}


@pytest.mark.parametrize("method", ["hip", "blocktopk"])
def test_last_query_block_reads_every_key_at_prefill(method):
    from patchattn.methods._sparse import block_lists
    from patchattn.registry import get_spec
    from patchattn.state import PatchContext, PatchState

    g = BlockGeometry(300, 300, 16, 16)
    q, k = torch.randn(1, 4, 300, 8), torch.randn(1, 2, 300, 8)
    counts = {}
    for flag in (True, False):
        state = PatchState(get_spec(method).config_cls(block_size=16, top_k=2, last_block_dense=flag), 1, "text",
                           PatchContext())
        _, counts[flag] = block_lists(state, g, q, k, get_spec(method).select, static=False)
    assert (counts[True][..., -1] == g.n_k).all()
    assert (counts[False][..., -1] < g.n_k).all()
    assert torch.equal(counts[True][..., :-1], counts[False][..., :-1])


def test_hip_decode_reuses_lists_until_refresh_or_a_new_block():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 97))  # 97 + 3 generated keys stay within the 7th 16-token block
    with patchattn.patched(model, "hip", block_size=16, top_k=1, refresh_interval=3, dense_layers=[]):
        # prefill, then decode steps: the first selects (age 0), the next reuses the same lists (age 1)
        model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        state = model.model.layers[1].self_attn.patchattn
        assert state.method_state.decode.age == 1
        # 95 + 3: the second decode step's key (position 96) starts a new block, so it selects afresh.
        model.generate(input_ids=ids[:, :95], max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert state.method_state.decode.age == 0


def test_compressed_key_cache_matches_recompute_while_decoding():
    from patchattn.methods._shared import block_means, key_block_means
    from patchattn.state import PatchContext, PatchState

    state = PatchState(patchattn.get_config("blocktopk"), 0, "text", PatchContext())
    key = torch.randn(2, 3, 100, 8)
    key_block_means(state, key[:, :, :70], 16, q_len=70)
    for t in range(71, 101):
        got = key_block_means(state, key[:, :, :t], 16, q_len=1)
        assert torch.allclose(got, block_means(key[:, :, :t], 16), atol=1e-6)
        again = key_block_means(state, key[:, :, :t], 16, q_len=1)  # same length twice (e.g. a re-run)
        assert torch.equal(again, got)
    # A new, shorter sequence (a new generate call) is recomputed, not mixed with the old cache.
    fresh = torch.randn(2, 3, 40, 8)
    assert torch.allclose(key_block_means(state, fresh, 16, q_len=1), block_means(fresh, 16))


def test_streaming_small_window_decode_matches_full_forward():
    """A decode step reads what its query block reads in a full forward (the block's first row sets the window)."""
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 70))
    with patchattn.patched(model, "streaming", block_size=16, window=20):
        generated = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        full = _logits(model, input_ids=generated[:, :-1])
    assert torch.equal(full[0, ids.shape[1] - 1:].argmax(-1), generated[0, ids.shape[1]:])


def test_stats_are_recorded_without_evaluating_them_until_read():
    """A call records tensors and functions as they are (no device sync, no extra kernels); reading converts."""
    from patchattn.state import PatchContext, PatchState

    state = PatchState(patchattn.get_config("blocktopk"), 0, "text", PatchContext())
    calls = []

    def density():
        calls.append(1)
        return torch.tensor(0.25)

    state.record(density=density, tile_skip=torch.tensor(0.5), other=1)
    assert calls == []
    assert state.stats == {"density": 0.25, "tile_skip": 0.5, "other": 1.0}
    assert calls == [1]


@pytest.mark.parametrize("method", ["blocktopk", "hip"])
def test_decode_lists_are_sized_by_the_method_bound_not_the_cache(method):
    """While decoding, lists are top_k + sink + local wide (no host sync to size them), whatever the cache length."""
    from patchattn.masks import BlockGeometry
    from patchattn.methods._sparse import block_lists
    from patchattn.registry import get_spec
    from patchattn.state import PatchContext, PatchState

    config = patchattn.get_config(method, block_size=16, top_k=3, sink_blocks=1, local_blocks=2)
    state = PatchState(config, 1, "text", PatchContext())
    key = torch.randn(1, 2, 500, 32)
    query = torch.randn(1, 4, 1, 32)
    idx, counts = block_lists(state, BlockGeometry(1, 500, 16, 16), query, key, get_spec(method).select, False)
    assert idx.shape[-1] == config.max_blocks_per_row(32) == 6
    assert (counts == 6).all()  # 3 chosen + sink + 2 local, all distinct at this length


def test_block_sparse_methods_carry_their_selector_on_the_spec():
    """``register_sparse_method`` puts the selector and its static flag on the spec; other methods have neither."""
    from patchattn.registry import all_specs, get_spec

    sparse = {spec.name: spec for spec in all_specs() if spec.category == "sparse"}
    assert set(sparse) == {"blocktopk", "duo", "hip", "hyper", "moa", "power", "s2", "streaming"}
    assert all(callable(spec.select) for spec in sparse.values())
    assert {name for name, spec in sparse.items() if spec.static} == {"duo", "moa", "power", "s2", "streaming"}
    for name in ("dense", "moh", "act", "headscale", "longlora", "sinklora"):
        assert get_spec(name).select is None and not get_spec(name).static


def test_a_user_sparse_method_is_registered_by_its_selector_alone():
    """A selector that reads every causal block, registered once by name, runs through the shared forward and
    reproduces dense attention."""
    from dataclasses import dataclass

    from patchattn.methods._sparse import SparseConfig, register_sparse_method
    from patchattn.registry import _METHODS, get_spec

    @dataclass(kw_only=True)
    class EverythingConfig(SparseConfig):
        """No knobs."""

    def select(g, query, key, state):
        return causal_allowed(g, query.device)

    try:
        register_sparse_method("test_everything", config=EverythingConfig, select=select, static=True, paper="test",
                               doc="Every causal block.")
        spec = get_spec("test_everything")
        assert spec.select is select and spec.static and spec.category == "sparse"
        assert spec.forward.__name__ == "test_everything_attention" and spec.summary == "Every causal block."
        model = tiny_model("llama")
        ids = torch.randint(3, 100, (1, 70))
        with torch.no_grad():
            want = model(input_ids=ids).logits
            with patchattn.patched(model, "test_everything", block_size=16, backend="torch"):
                got = model(input_ids=ids).logits
        assert max_abs_diff(got, want) < 1e-4
    finally:
        _METHODS.pop("test_everything", None)
