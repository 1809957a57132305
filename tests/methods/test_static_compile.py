"""A static cache's decode steps need no host read: ``KeyBounds`` from the mask, lists counted from each row's first
real key (``decode_rows``), so the step compiles whole and gives the default cache's tokens.

Methods without ``decode_rows`` / ``key_bounds`` are listed in ``HOST_CUT``: their static-cache decode is cut on the
host (``adapters.hf.causal_keys``), which compiles only with graph breaks; the test pins that so a fix shows."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import CompileConfig, StaticCache

import patchattn
from patchattn.masks import (BlockGeometry, RowGeometry, power_of_two_device_rows, power_of_two_row, rows_lists,
                             runs_lists, sink_and_window_device_rows, sink_and_window_row, strided_shard_device_rows,
                             strided_shard_rows)
from patchattn.methods._rows import key_bounds
from patchattn.registry import get_spec
from patchattn.testing import tiny_model
from pin_cases import PIN_CASES, method_of

ROW_PATTERNS = {
    "sink_and_window": (lambda g: sink_and_window_row(g, 20, 70), lambda r: sink_and_window_device_rows(r, 20, 70)),
    "power_of_two": (lambda g: power_of_two_row(g, 1, 2), lambda r: power_of_two_device_rows(r, 1, 2)),
    "strided_shards": (lambda g: strided_shard_rows(g.n_k, 3, 2, 3), lambda r: strided_shard_device_rows(r, 3, 2, 3)),
}


@pytest.mark.parametrize("pattern", sorted(ROW_PATTERNS))
def test_device_rows_equal_each_rows_host_lists(pattern):
    """Every length 0..capacity at once on the device == the host runs of each length (the decode lists in use)."""
    host_row, device_rows = ROW_PATTERNS[pattern]
    capacity, block, width = 300, 16, 30
    lengths = torch.arange(capacity + 1)
    idx, cnt = rows_lists(device_rows(RowGeometry(lengths, capacity, block, block)), width)
    for length in range(1, capacity + 1):
        want_idx, want_cnt = runs_lists(host_row(BlockGeometry(1, length, block, block)), width)
        heads = want_idx.shape[1]
        got_cnt = cnt[length].expand(heads, 1)
        assert torch.equal(got_cnt, want_cnt[0]), (pattern, length)
        for h in range(heads):
            n = int(want_cnt[0, h, 0])
            assert torch.equal(idx[length, min(h, idx.shape[1] - 1), 0, :n], want_idx[0, h, 0, :n]), (pattern, length)
    assert int(cnt[0].max()) == 0  # an empty row reads nothing


def test_key_bounds_read_padding_and_empty_slots():
    mask = torch.zeros(3, 1, 1, 10, dtype=torch.bool)
    mask[0, ..., :6] = True   # static cache: 6 keys written, 4 empty slots
    mask[1, ..., 2:6] = True  # and left padding
    bounds = key_bounds(mask)  # row 2: nothing real
    assert bounds.starts.tolist() == [0, 2, 0] and bounds.ends.tolist() == [6, 6, 0]


# hyper's default ties="topk" keeps torch.topk's order among equal scores, which depends on the list width: over rows
# of different lengths it selects each row on the host (exact, but a graph break); ties="lowest" is the device path.
HOST_ROWS = {"hyper"}
DEVICE_ROWS = [case for case in PIN_CASES if get_spec(method_of(case)).key_bounds and case not in HOST_ROWS]


@pytest.mark.parametrize("case", DEVICE_ROWS + ["dense"])
def test_static_cache_decode_step_compiles_whole(case):
    """One static-cache decode step, compiled with fullgraph=True, gives the eager step's logits (left-padded batch:
    the rows' real keys start at different slots, and the cache has empty slots after them)."""
    torch._dynamo.reset()
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 200), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :13] = 0
    with torch.no_grad(), patchattn.patched(model, method_of(case), **PIN_CASES.get(case, {})):
        cache = StaticCache(config=model.config, max_cache_len=256)
        out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        mask2 = torch.cat([mask, torch.ones_like(token)], dim=1)
        position = torch.tensor([200])

        def step(x, c):
            return model(input_ids=x, attention_mask=mask2, past_key_values=c, cache_position=position,
                         use_cache=True).logits

        want = step(token, copy.deepcopy(cache))
        got = torch.compile(step, fullgraph=True, backend="eager")(token, cache)
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("case", DEVICE_ROWS)
def test_compiled_static_generate_gives_the_default_caches_tokens(case):
    """transformers' own compile of the static-cache decode step (fullgraph=True) generates the default cache's
    tokens (a prompt long enough that each method reads a strict subset of the blocks)."""
    torch._dynamo.reset()
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 220), generator=torch.Generator().manual_seed(2))
    settings = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    compiled = CompileConfig(fullgraph=True, backend="eager")
    compiled._compile_all_devices = True  # transformers compiles on CUDA only unless told
    with torch.no_grad(), patchattn.patched(model, method_of(case), **PIN_CASES.get(case, {})):
        want = model.generate(input_ids=ids, **settings)
        got = model.generate(input_ids=ids, cache_implementation="static", compile_config=compiled, **settings)
    assert torch.equal(got, want)


@pytest.mark.parametrize("padded", [False, True])
def test_dense_layers_decode_on_the_kernel_with_every_block(monkeypatch, padded):
    """On a GPU a dense layer's decode step runs the split-K kernel with every block listed instead of SDPA (cuDNN
    plans every new key length on the host); forced here on CPU, the step equals SDPA's."""
    import patchattn.methods._sparse as sparse

    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 70), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :9] = 0
    config = {**PIN_CASES["streaming"], "dense_layers": [0, 1]}
    with torch.no_grad(), patchattn.patched(model, "streaming", **config):
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        step = {"input_ids": token, "attention_mask": torch.cat([mask, torch.ones_like(token)], 1)}
        want = model(**step, past_key_values=copy.deepcopy(out.past_key_values)).logits
        monkeypatch.setattr(sparse, "dense_decode_on_kernel", lambda state, query, reason: reason == "dense layer")
        got = model(**step, past_key_values=out.past_key_values).logits
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("case", ["blocktopk", "hip"])
def test_decode_buffers_exist_before_the_first_compiled_step(case):
    """A static cache's prefill makes the decode buffers (compressed key cache, per-row lists) eagerly, and the
    compiled steps refill those same tensors: a buffer made inside a compiled step would be a CUDA graph's output,
    overwritten by its next replay."""
    torch._dynamo.reset()
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 200), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :21] = 0
    with torch.no_grad(), patchattn.patched(model, method_of(case), **PIN_CASES[case]):
        cache = StaticCache(config=model.config, max_cache_len=256)
        out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        states = [layer.self_attn.patchattn.method_state for layer in model.model.layers]
        before = [s.row_means.means for s in states]
        assert all(m is not None and m.shape[2] == 256 // 16 for m in before)
        lists = [s.rows_decode.lists for s in states] if case == "hip" else []
        token = out.logits[:, -1:].argmax(-1)
        mask2 = torch.cat([mask, torch.ones_like(token)], dim=1)
        step = torch.compile(lambda x: model(input_ids=x, attention_mask=mask2, past_key_values=cache,
                                             cache_position=torch.tensor([200]), use_cache=True).logits,
                             fullgraph=True, backend="eager")
        step(token)
    assert all(s.row_means.means is m for s, m in zip(states, before))
    assert all(s.rows_decode.lists is m for s, m in zip(states, lists))
