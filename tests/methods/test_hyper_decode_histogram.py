"""``hyper``'s decode steps keep the key blocks' bucket histogram (``KeyHistogram``) instead of re-hashing the cache.

The reference is the full-rehash path (every call hashes every key: ``keeps_histogram`` forced off, which is the
code before design note 51).  Checked on the tiny Llama: greedy ``generate`` gives the same tokens (ties ``topk``
and ``lowest``, GQA and plain multi-head, a left-padded batch of 2, a ``min_seq_len`` crossed while decoding, a new
prompt after a finished generate, beam search, a cropped cache); a decode step hashes at most one block of keys
where the reference hashed all of them (``lsh_buckets`` wrapped with a counter); the kept counts equal a recount of
the cache's keys after many steps; direct selector calls give the reference's masks when the cache grows, is cut or
is replaced.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import patchattn
from patchattn.masks import BlockGeometry
from patchattn.methods import hyper
from patchattn.registry import get_spec
from patchattn.state import PatchContext, PatchState
from patchattn.testing import tiny_model

BLOCK = 16
SETTINGS = {"block_size": BLOCK, "backend": "torch", "min_seq_len": 0, "lsh_blocks": 2, "sample_size": 16,
            "local_blocks": 1, "bucket_keys": 24, "lsh_num_projs": 4}
STEPS = 24  # crosses at least one block boundary from any prompt length
ARGS = {"max_new_tokens": STEPS, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}  # every step runs


class Hashed:
    """Wraps ``hyper.lsh_buckets``: how many vectors each call hashed, in order."""

    def __init__(self, monkeypatch):
        self.sizes: list[int] = []
        inner = hyper.lsh_buckets

        def counted(x, proj):
            self.sizes.append(x.shape[2])
            return inner(x, proj)

        monkeypatch.setattr(hyper, "lsh_buckets", counted)

    def clear(self):
        self.sizes.clear()


def full_rehash(monkeypatch):
    """The reference path: no call keeps its histogram, so every call hashes every key."""
    monkeypatch.setattr(hyper, "keeps_histogram", lambda key: False)


def _mha_model():
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _prompt(n: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, 100, (batch, n), generator=torch.Generator().manual_seed(seed))


def _generate(model, settings, *, reference: bool, monkeypatch, **kwargs):
    with monkeypatch.context() as patch:
        if reference:
            full_rehash(patch)
        with torch.no_grad(), patchattn.patched(model, "hyper", **settings):
            return model.generate(**kwargs, **ARGS)


def _decode_sizes(sizes: list[int], prompt_tokens: int) -> list[int]:
    """The hashed sizes of the decode steps (after the prefill's calls, which hash the prompt's queries and keys)."""
    last_prefill = max(i for i, n in enumerate(sizes) if n == prompt_tokens)
    return sizes[last_prefill + 1:]


@pytest.mark.parametrize("ties", ["topk", "lowest"])
@pytest.mark.parametrize("family", ["llama_gqa", "llama_mha"])
def test_generate_tokens_equal_the_full_rehash_and_a_step_hashes_one_block(ties, family, monkeypatch):
    model = tiny_model("llama") if family == "llama_gqa" else _mha_model()
    settings = {**SETTINGS, "ties": ties}
    ids = _prompt(139)
    hashed = Hashed(monkeypatch)
    want = _generate(model, settings, reference=True, monkeypatch=monkeypatch, input_ids=ids)
    old = _decode_sizes(hashed.sizes, ids.shape[1])
    hashed.clear()
    got = _generate(model, settings, reference=False, monkeypatch=monkeypatch, input_ids=ids)
    new = _decode_sizes(hashed.sizes, ids.shape[1])
    assert torch.equal(got, want)
    layers = model.config.num_hidden_layers
    assert len(new) == len(old) == 2 * layers * (STEPS - 1)  # per layer and step: the keys, then the query
    # The full rehash hashed every cached key each step (what the next assertion fails on, before note 51) ...
    assert max(old[0::2]) == ids.shape[1] + STEPS - 1
    # ... the kept histogram only the block that gained the new key (and the one query).
    assert max(new[0::2]) <= BLOCK and max(new[1::2]) == 1


def test_kept_counts_equal_a_recount_of_the_cache(monkeypatch):
    """After many decode steps through the default cache (several new blocks started), each layer's kept counts are
    bit for bit the histogram of the cache's keys hashed from scratch."""
    model = tiny_model("llama")
    ids = _prompt(150, seed=3)
    steps = _prompt(40, seed=4)
    with torch.no_grad(), patchattn.patched(model, "hyper", **SETTINGS):
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        for t in range(steps.shape[1]):
            model(input_ids=steps[:, t:t + 1], past_key_values=cache, use_cache=True)
        for i, layer in enumerate(model.model.layers):
            state = layer.self_attn.patchattn
            kept = state.method_state.key_hist
            keys = cache.layers[i].keys
            assert kept is not None and kept.tokens == keys.shape[2] == 190
            proj = hyper.lsh_projections(state, keys.shape[-1], keys.device)
            recount = hyper.bucket_histogram(hyper.lsh_buckets(keys, proj), BLOCK, 1 << proj.shape[1])
            assert torch.equal(kept.counts, recount), f"layer {i}"


def test_left_padded_batch_of_two_gives_the_full_rehash_tokens(monkeypatch):
    """A batch of several rows may be reordered between steps with nothing the host sees changing (beam search):
    it recounts every step, so its tokens are the reference's for both ties (topk: rows on the host, one by one;
    lowest: the device rows path with its own ``KeyBuckets``)."""
    model = tiny_model("llama")
    rows = [_prompt(150, seed=5)[0], _prompt(131, seed=6)[0]]
    ids = torch.zeros(2, 150, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, 150 - len(row):], mask[i, 150 - len(row):] = row, 1
    for ties in ("topk", "lowest"):
        settings = {**SETTINGS, "ties": ties}
        want = _generate(model, settings, reference=True, monkeypatch=monkeypatch, input_ids=ids,
                         attention_mask=mask)
        with torch.no_grad(), patchattn.patched(model, "hyper", **settings):
            got = model.generate(input_ids=ids, attention_mask=mask, **ARGS)
            for layer in model.model.layers:  # the prefill's row groups' histograms: freed by the first step
                kept = layer.self_attn.patchattn.method_state
                assert kept.row_states and all(group.key_hist is None for group in kept.row_states.values())
        assert torch.equal(got, want), ties


def test_static_cache_of_one_row_continues_the_histogram(monkeypatch):
    """A static cache's decode steps come with a mask (the rows path); with ``ties="topk"`` a batch of one row is
    selected on the host and continues its histogram: the default cache's tokens, one block hashed a step."""
    model = tiny_model("llama")
    ids = _prompt(139, seed=14)
    hashed = Hashed(monkeypatch)
    want = _generate(model, SETTINGS, reference=True, monkeypatch=monkeypatch, input_ids=ids)
    hashed.clear()
    got = _generate(model, SETTINGS, reference=False, monkeypatch=monkeypatch, input_ids=ids,
                    cache_implementation="static")
    assert torch.equal(got, want)
    keys = _decode_sizes(hashed.sizes, ids.shape[1])[0::2]
    assert len(keys) == model.config.num_hidden_layers * (STEPS - 1) and max(keys) <= BLOCK


def test_min_seq_len_crossed_while_decoding(monkeypatch):
    """Below ``min_seq_len`` a call reads every block and hashes nothing (and keeps nothing): the first step at
    ``min_seq_len`` recounts the cache once, the steps after it hash one block."""
    model = tiny_model("llama")
    settings = {**SETTINGS, "min_seq_len": 150}
    ids = _prompt(140, seed=7)
    hashed = Hashed(monkeypatch)
    want = _generate(model, settings, reference=True, monkeypatch=monkeypatch, input_ids=ids)
    hashed.clear()
    got = _generate(model, settings, reference=False, monkeypatch=monkeypatch, input_ids=ids)
    assert torch.equal(got, want)
    keys = hashed.sizes[0::2]
    layers = model.config.num_hidden_layers
    assert keys[:layers] == [150] * layers  # the crossing step: every key, once per layer
    assert len(keys) == layers * (140 + STEPS - 150) and max(keys[layers:]) <= BLOCK


def test_new_prompt_after_a_finished_generate(monkeypatch):
    """A second ``generate`` on the same patched model (a shorter prompt, then a longer one): its prefill clears the
    kept histogram, so neither continues the last sequence's counts."""
    model = tiny_model("llama")
    prompts = [_prompt(150, seed=8), _prompt(120, seed=9), _prompt(170, seed=10)]

    def run(reference):
        with monkeypatch.context() as patch:
            if reference:
                full_rehash(patch)
            with torch.no_grad(), patchattn.patched(model, "hyper", **SETTINGS):
                return [model.generate(input_ids=ids, **ARGS) for ids in prompts]

    for got, want in zip(run(False), run(True)):
        assert torch.equal(got, want)


def test_beam_search_gives_the_full_rehash_tokens(monkeypatch):
    """Beam search reorders the cache's rows every step (same shapes): a batch of several rows keeps no histogram."""
    model = tiny_model("llama")
    ids = _prompt(150, seed=11)
    args = {"input_ids": ids, "num_beams": 3}
    want = _generate(model, SETTINGS, reference=True, monkeypatch=monkeypatch, **args)
    got = _generate(model, SETTINGS, reference=False, monkeypatch=monkeypatch, **args)
    assert torch.equal(got, want)
    assert got.shape[1] == ids.shape[1] + STEPS


def test_cropped_cache_recounts(monkeypatch):
    """A cache cut back (assisted decoding's rejected candidates) and fed other tokens: the keys counted no longer
    match the keys before the call, so the step recounts; the logits are the reference's, and several tokens in one
    call (a verification step) continue the histogram too."""
    model = tiny_model("llama")
    ids = _prompt(150, seed=12)
    feed = _prompt(12, seed=13)

    def run(reference):
        out = []
        with monkeypatch.context() as patch:
            if reference:
                full_rehash(patch)
            with torch.no_grad(), patchattn.patched(model, "hyper", **SETTINGS):
                cache = DynamicCache(config=model.config)
                model(input_ids=ids, past_key_values=cache, use_cache=True)
                for t in range(6):
                    out.append(model(input_ids=feed[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
                cache.crop(-3)
                out.append(model(input_ids=feed[:, 6:10], past_key_values=cache, use_cache=True).logits)
                cache.crop(-2)
                for t in range(10, 12):
                    out.append(model(input_ids=feed[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
        return out

    for got, want in zip(run(False), run(True)):
        assert torch.equal(got, want)


def test_prefill_under_inference_mode_then_steps_under_no_grad(monkeypatch):
    """The kept counts made under ``torch.inference_mode`` are not updated in place from outside it (torch refuses):
    the steps copy them instead, and give the reference's logits."""
    model = tiny_model("llama")
    ids, feed = _prompt(150, seed=15), _prompt(4, seed=16)

    def run(reference):
        with monkeypatch.context() as patch:
            if reference:
                full_rehash(patch)
            with patchattn.patched(model, "hyper", **SETTINGS):
                cache = DynamicCache(config=model.config)
                with torch.inference_mode():
                    model(input_ids=ids, past_key_values=cache, use_cache=True)
                with torch.no_grad():
                    return [model(input_ids=feed[:, t:t + 1], past_key_values=cache, use_cache=True).logits
                            for t in range(feed.shape[1])]

    for got, want in zip(run(False), run(True)):
        assert torch.equal(got, want)


# ---- the selector alone --------------------------------------------------------------------------------------------
def _state(**overrides):
    config = get_spec("hyper").config_cls(**{**SETTINGS, **overrides})
    return PatchState(config, layer_index=0, role="text", context=PatchContext())


@pytest.mark.parametrize("ties", ["topk", "lowest"])
def test_selector_masks_equal_a_fresh_state_as_the_cache_grows_is_cut_or_replaced(ties, monkeypatch):
    """``select_hyper`` on a kept state against a fresh state per call, over: single-token steps across block
    boundaries, several tokens at once, a cut cache, a new key after the same prefix, another cache after the state is
    cleared (what a prefill does), a batch of two; and how many keys each call hashed."""
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, 260, 16, generator=gen)
    other = torch.randn(1, 2, 260, 16, generator=gen)
    queries = torch.randn(1, 4, 260, 16, generator=gen)
    state = _state(ties=ties)
    hashed = Hashed(monkeypatch)

    def call(k, q_len, kept_state):
        t = k.shape[2]
        g = BlockGeometry(q_len, t, BLOCK, BLOCK)
        q = queries[:, :, t - q_len:t].expand(k.shape[0], -1, -1, -1)
        return hyper.select_hyper(g, q, k, kept_state)

    def check(k, q_len, most_hashed):
        hashed.clear()
        got = call(k, q_len, state)
        keys_hashed = hashed.sizes[0]
        want = call(k, q_len, _state(ties=ties))
        assert torch.equal(got, want), (k.shape, q_len)
        assert keys_hashed <= most_hashed, (k.shape, q_len, keys_hashed)

    check(keys[:, :, :150], 150, 150)  # a prefill
    for t in range(151, 200):
        check(keys[:, :, :t], 1, BLOCK)  # decode steps: one block at most
    check(keys[:, :, :204], 5, BLOCK + 4)  # five tokens at once
    check(keys[:, :, :190], 1, 190)  # a cut cache (189 keys before the call, 204 counted): recounted
    check(keys[:, :, :191], 1, BLOCK)
    check(torch.cat([keys[:, :, :191], other[:, :, :1]], 2), 1, BLOCK)  # the same prefix, another new key
    state.method_state.key_hist = None  # (what a prefill does: ``run_block_sparse`` clears the cache fields)
    check(other[:, :, :193], 1, 193)
    check(other[:, :, :194].expand(2, -1, -1, -1), 1, 194)  # two rows: recounted, and nothing kept
    assert state.method_state.key_hist is None
    check(other[:, :, :195], 1, 195)
