"""Static patterns while decoding: the arithmetic block lists equal the mask path's, in isolation and in a model."""

import pytest
import torch

import patchattn
from patchattn.kernels.blocksparse import blocks_from_mask
from patchattn.masks import BlockGeometry, power_of_two, sink_and_window, strided_shards
from patchattn.methods import power, s2, streaming
from patchattn.methods._sparse import block_lists, mask_lists
from patchattn.registry import get_spec
from patchattn.state import PatchContext, PatchState
from patchattn.testing import tiny_model

# method -> (module, its list builder's name, the mask factory it must agree with, that factory's arguments)
PATTERNS = {
    "streaming": (streaming, "sink_and_window_lists", sink_and_window, lambda c, heads: (c.sink_tokens, c.window)),
    "power": (power, "power_of_two_lists", power_of_two, lambda c, heads: (c.sink_blocks, c.local_blocks)),
    "s2": (s2, "strided_shard_lists", strided_shards, lambda c, heads: (heads, c.local_blocks, c.vert_stride)),
}

CONFIGS = [
    ("streaming", {}),
    ("streaming", {"block_size": 16, "sink_tokens": 4, "window": 40}),
    ("streaming", {"block_size": 16, "sink_tokens": 0, "window": 1}),
    ("streaming", {"block_size": 32, "sink_tokens": 100, "window": 20}),
    ("streaming", {"block_size": 16, "sink_tokens": 17, "window": 16}),
    ("streaming", {"block_size": 16, "window": 1 << 30}),
    ("power", {}),
    ("power", {"block_size": 16, "sink_blocks": 0, "local_blocks": 1}),
    ("power", {"block_size": 16, "sink_blocks": 3, "local_blocks": 2}),
    ("power", {"block_size": 32, "sink_blocks": 1, "local_blocks": 7}),
    ("power", {"block_size": 16, "local_blocks": 1 << 30}),
    ("s2", {}),
    ("s2", {"block_size": 16, "local_blocks": 2, "vert_stride": 8}),
    ("s2", {"block_size": 16, "local_blocks": 1, "vert_stride": 3}),
    ("s2", {"block_size": 32, "local_blocks": 4, "vert_stride": 1}),
]

# Every cache length up to ~6 blocks of 64 (partial blocks, kv shorter than the window or the local run), then
# long caches (many shard and power-of-two blocks, lengths either side of a block edge).
KV_LENS = list(range(1, 400)) + [1023, 1024, 1025, 2047, 2048, 2049, 5000, 70001]


def _state(method, overrides):
    return PatchState(patchattn.get_config(method, **overrides), 0, "text", PatchContext())


@pytest.mark.parametrize("method,overrides", CONFIGS)
def test_decode_lists_equal_the_mask_path(method, overrides):
    state = _state(method, overrides)
    block = state.config.block_size
    _, _, mask_fn, params = PATTERNS[method]
    select = get_spec(method).select
    for heads in ([4, 8, 12] if method == "s2" else [4]):
        key = torch.zeros(1, 2, 1, 8)  # the static patterns never read keys
        for kv_len in KV_LENS:
            for q_len in sorted({1, 3, block} & set(range(1, kv_len + 1))):
                g = BlockGeometry(q_len, kv_len, block, block)
                assert g.n_q == 1
                query = torch.zeros(1, heads, q_len, 8)
                lists = select(g, query, key, state)
                assert isinstance(lists, tuple), "one query block must skip the mask"
                mask = mask_fn(g, *params(state.config, heads))
                want = mask_lists(state.config, g, mask, query.device)
                where = f"{method} {overrides} heads={heads} q_len={q_len} kv_len={kv_len}"
                # The config's width bound holds: no block of the mask is cut off the lists.
                assert torch.equal(want[1].flatten().long(), mask.sum(-1).flatten().long()), where
                for got, expected in zip(lists, want):
                    assert got.dtype == expected.dtype == torch.int32, where
                    assert got.shape == expected.shape, where
                    assert got.is_contiguous(), where
                # Same blocks per row, ascending, and the same padding (0) past each count.
                assert torch.equal(lists[1], want[1]), where
                assert torch.equal(lists[0], want[0]), where


def test_decode_lists_go_through_the_static_cache_unchanged():
    state = _state("power", {"block_size": 16})
    g = BlockGeometry(1, 500, 16, 16)
    query, key = torch.zeros(1, 4, 1, 8), torch.zeros(1, 2, 1, 8)
    first = block_lists(state, g, query, key, get_spec("power").select, static=True)
    again = block_lists(state, g, query, key, get_spec("power").select, static=True)
    assert again is first
    # Lists as wide as the pattern's bound, not the whole cache: the decode kernel splits the width among programs.
    assert first[0].shape == (1, 1, 1, state.config.max_blocks_per_row(g.n_k)) and g.n_k > first[0].shape[-1]


# ---- end to end: a patched model's decode steps are unchanged ------------------------------------------------
def _mask_path(mask_fn):
    """A stand-in for a method's list builder that takes the old route: build the mask, then ``blocks_from_mask``."""

    def lists(g, *args):
        *params, width, device = args
        mask = mask_fn(g, *params, device=device)
        while mask.ndim < 4:
            mask = mask[None]
        return blocks_from_mask(mask, width=width)

    return lists


def _decode_logits(model, ids, steps):
    out = model.generate(**ids, max_new_tokens=steps, do_sample=False, pad_token_id=0, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, 1)


E2E = [("streaming", {"window": 20, "sink_tokens": 4}), ("power", {"local_blocks": 1}),
       ("s2", {"local_blocks": 1, "vert_stride": 3})]


@pytest.mark.parametrize("method,overrides", E2E)
def test_patched_model_decode_matches_the_mask_path(method, overrides, monkeypatch):
    module, name, mask_fn, _ = PATTERNS[method]
    model = tiny_model("llama")
    torch.manual_seed(0)
    ids = torch.randint(3, 100, (2, 75))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    # No padding: a padded batch's decode steps build their lists on the device (``decode_rows``), which
    # tests/methods/test_static_compile.py checks against these host lists for every length.
    calls = []
    arithmetic = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a: calls.append(1) or arithmetic(*a))
    # 75 + 12 keys cross two 16-token block edges (80, 96) while decoding.
    with patchattn.patched(model, method, block_size=16, **overrides):
        new_seq, new_logits = _decode_logits(model, inputs, 12)
        assert calls, "decode steps must use the arithmetic lists"
        monkeypatch.setattr(module, name, _mask_path(mask_fn))
        old_seq, old_logits = _decode_logits(model, inputs, 12)
    assert torch.equal(new_seq, old_seq)
    assert torch.equal(new_logits, old_logits)


@pytest.mark.parametrize("method", ["streaming", "power", "s2"])
def test_decode_lists_are_built_once_per_plan(method, monkeypatch):
    """Steps within one key block reuse the lists (no kernels to build them); a new block builds new ones, equal to
    a fresh build; the memo keeps a bounded number of plans."""
    from patchattn.methods import _sparse

    monkeypatch.setattr(_sparse, "_DECODE_LISTS", type(_sparse._DECODE_LISTS)())
    monkeypatch.setattr(_sparse, "DECODE_LISTS_KEPT", 4)
    state = _state(method, {"block_size": 16})
    select = get_spec(method).select
    query, key = torch.zeros(1, 4, 1, 8), torch.zeros(1, 2, 1, 8)
    first = select(BlockGeometry(1, 1000, 16, 16), query, key, state)
    again = select(BlockGeometry(1, 1001, 16, 16), query, key, state)  # same block count: same plan
    assert again[0] is first[0] and again[1] is first[1]
    later = select(BlockGeometry(1, 1009, 16, 16), query, key, state)  # a new key block starts
    assert later[0] is not first[0]
    monkeypatch.setattr(_sparse, "_DECODE_LISTS", type(_sparse._DECODE_LISTS)())
    fresh = select(BlockGeometry(1, 1009, 16, 16), query, key, state)
    assert torch.equal(fresh[0], later[0]) and torch.equal(fresh[1], later[1])
    for kv_len in range(1100, 1300, 16):
        select(BlockGeometry(1, kv_len, 16, 16), query, key, state)
    assert len(_sparse._DECODE_LISTS) == 4


def _window_rows_mask(g, sink_tokens, windows):
    """The mask path of a per-head sink + window pattern: one ``sink_and_window`` row per head."""
    return torch.stack([sink_and_window(g, sink_tokens, w) for w in windows])


@pytest.mark.parametrize("method,overrides", [("moa", {"block_size": 16}), ("moa", {"block_size": 16, "density": 0.2}),
                                              ("duo", {"block_size": 16, "kv_heads_together": False}),
                                              ("duo", {"block_size": 16, "window": 40, "kv_heads_together": False})])
def test_per_head_window_decode_lists_equal_the_mask_path(method, overrides):
    """moa's elastic windows and duo's full / streaming heads decode through per-head window lists: the same lists
    as building each head's mask row and ``blocks_from_mask``, at every cache length."""
    from patchattn.methods.duo import retrieval_heads
    from patchattn.methods.moa import head_windows, layer_rules

    state = _state(method, overrides)
    heads = 8
    if method == "duo":
        state.method_state.retrieval = retrieval_heads(torch.tensor([[0.0, 3, 0, 1, 0, 0, 2, 0]]), 0.375)[0]
    select = get_spec(method).select
    key = torch.zeros(1, 2, 1, 8)
    for kv_len in list(range(1, 300)) + [1023, 1024, 1025, 5000]:
        g = BlockGeometry(1, kv_len, 16, 16)
        query = torch.zeros(1, heads, 1, 8)
        lists = select(g, query, key, state)
        assert isinstance(lists, tuple), "one query block must skip the mask"
        if method == "moa":
            windows = head_windows(layer_rules(state.config, None, state.layer_index, heads), kv_len)
            mask = _window_rows_mask(g, state.config.sink_blocks * 16, windows)
        else:
            windows = [kv_len if full else state.config.window for full in state.method_state.retrieval.tolist()]
            mask = _window_rows_mask(g, state.config.sink_tokens, windows)
        want = mask_lists(state.config, g, mask, query.device)
        assert torch.equal(lists[1], want[1]) and torch.equal(lists[0], want[0]), f"{method} kv_len={kv_len}"
    if method == "duo":  # the full heads read every block
        assert lists[1].flatten()[state.method_state.retrieval].eq(g.n_k).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("method", ["streaming", "power", "s2", "moa", "duo"])
def test_static_decode_lists_build_inside_a_cuda_graph(method, monkeypatch):
    """A decode step captured before its plan is memoised builds the lists inside the graph (element-wise kernels,
    no host copy or sync), stores nothing, and replays the lists an eager build gives."""
    from patchattn.methods import _sparse
    from patchattn.methods.duo import retrieval_heads

    monkeypatch.setattr(_sparse, "_DECODE_LISTS", type(_sparse._DECODE_LISTS)())
    state = _state(method, {"block_size": 16, **({"kv_heads_together": False} if method == "duo" else {})})
    if method == "duo":
        state.method_state.retrieval = retrieval_heads(torch.tensor([[0.0, 3, 0, 1, 0, 0, 2, 0]]), 0.375)[0]
    select = get_spec(method).select
    g = BlockGeometry(1, 5000, 16, 16)
    query, key = torch.zeros(1, 8, 1, 8, device="cuda"), torch.zeros(1, 2, 1, 8, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = select(g, query, key, state)
    assert len(_sparse._DECODE_LISTS) == 0, "nothing is memoised while capturing"
    graph.replay()
    torch.cuda.synchronize()
    eager = select(g, query, key, state)
    assert torch.equal(captured[0], eager[0]) and torch.equal(captured[1], eager[1])
