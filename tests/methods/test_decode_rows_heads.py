"""The head-level methods (``act``, ``headscale``, ``moh``) and ``longlora`` decode with ``KeyBounds``: a static cache's
decode step reads each row's real keys and newest token on the device, so it generates the default cache's tokens
(batch 1, and a left-padded batch whose rows start at different slots) and compiles whole (``fullgraph=True``)
with the eager step's logits; what ``moh`` keeps between steps stays in its buffers, updated in place."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import StaticCache

import patchattn
from patchattn.methods._heads import full_causal_attention
from patchattn.registry import get_spec
from patchattn.state import get_state
from patchattn.testing import tiny_model
from pin_cases import PIN_CASES, method_of

TOLERANCE = 2e-5
PIN = ["act", "headscale", "headscale_gain", "moh", "moh_block", "longlora"]
# Settings that run the paths the pin settings leave out on the tiny model: act with calibrated heads (the pins'
# "auto" finds no shipped list), headscale's identity head, moh's learned router with routing blocks.
EXTRA = {
    "act_heads": {"backend": "torch", "heads": {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}, "threshold": 0.035},
    "headscale_identity": {"backend": "torch", "gains": {"1": {"2": 2.0}}, "modes": {"0": {"3": "identity"}}},
    "moh_learned": {"backend": "torch", "router": "learned", "route_block": 16, "init_std": 0.5},
}
CASES = PIN + list(EXTRA)


def _settings(case: str) -> dict:
    return EXTRA.get(case, PIN_CASES.get(case, {}))


def _batch(rows: int):
    """Prompts of 100 tokens; with 2 rows the second is left-padded by 13 (its real keys start at slot 13)."""
    ids = torch.randint(3, 100, (rows, 100), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    if rows > 1:
        mask[1, :13] = 0
    return ids, mask


def _method_states(model) -> list:
    return [get_state(layer.self_attn).method_state for layer in model.model.layers]


def test_every_case_declares_key_bounds():
    for case in CASES:
        assert get_spec(method_of(case)).key_bounds, case


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("case", CASES)
def test_static_cache_generates_the_default_caches_tokens(case, rows):
    model = tiny_model("llama")
    ids, mask = _batch(rows)
    settings = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "output_scores": True,
                "return_dict_in_generate": True}
    with torch.no_grad(), patchattn.patched(model, method_of(case), **_settings(case)):
        dynamic = model.generate(input_ids=ids, attention_mask=mask, **settings)
        if case == "act_heads":  # the calibration really runs: the prefill found hidden sinks
            assert any(state.columns is not None and state.columns.found for state in _method_states(model))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            static = model.generate(input_ids=ids, attention_mask=mask, cache_implementation="static", **settings)
    assert torch.equal(static.sequences, dynamic.sequences)
    diff = max((a - b).abs().max().item() for a, b in zip(static.scores, dynamic.scores))
    assert diff < TOLERANCE
    assert not [w for w in caught if "dense attention" in str(w.message)]


@pytest.mark.parametrize("case", CASES)
def test_compiled_static_decode_steps_give_the_eager_logits(case):
    """Two static-cache decode steps of a left-padded batch, compiled with fullgraph=True, give the eager steps'
    logits from the same state (the second step reads what the first kept)."""
    torch._dynamo.reset()
    model = tiny_model("llama")
    ids, mask = _batch(2)
    with torch.no_grad(), patchattn.patched(model, method_of(case), **_settings(case)):
        cache = StaticCache(config=model.config, max_cache_len=128)
        token = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1:]
        token = token.argmax(-1)
        after_prefill = copy.deepcopy(_method_states(model))

        def step(x, c, m, position):
            return model(input_ids=x, attention_mask=m, past_key_values=c, cache_position=position,
                         use_cache=True).logits

        def two_steps(run, c):
            logits, x, m = [], token, mask
            for position in (100, 101):
                m = torch.cat([m, torch.ones_like(x)], dim=1)
                logits.append(run(x, c, m, torch.tensor([position])))
                x = logits[-1][:, -1:].argmax(-1)
            return logits

        want = two_steps(step, copy.deepcopy(cache))
        for layer, kept in zip(model.model.layers, copy.deepcopy(after_prefill)):
            get_state(layer.self_attn).method_state = kept
        buffers = [(s.last_block, s.last_selection) for s in _method_states(model) if hasattr(s, "last_selection")]
        got = two_steps(torch.compile(step, fullgraph=True, backend="eager"), cache)
        after = [s for s in _method_states(model) if hasattr(s, "last_selection")]
    for a, b in zip(got, want):
        assert (a - b).abs().max().item() < 1e-5
    for (block, selection), state in zip(buffers, after):
        if block is not None:  # moh with routing blocks: the compiled steps wrote into the prefill's buffers
            assert state.last_block is block and state.last_selection is selection


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_full_causal_decode_over_key_bounds_equals_each_row_alone(backend, request):
    """The fused step of act and moh (every real block of each row, counted from its first real key; lse, active
    heads and gains): a padded batch in a static cache's layout (garbage in the empty slots) gives each row's own
    attention over its real keys, and zeros for a row with none."""
    device = request.getfixturevalue("triton_target") if backend == "triton" else "cpu"
    gen = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, dim, capacity = 3, 4, 2, 16, 150
    q = torch.randn(batch, heads, 1, dim, generator=gen)
    k, v = (torch.randn(batch, kv_heads, capacity, dim, generator=gen) * 3 for _ in range(2))
    active = torch.rand(batch, 1, heads, generator=gen) > 0.3
    gain = torch.rand(batch, 1, heads, generator=gen) + 0.5
    starts, ends = torch.tensor([0, 13, 0], dtype=torch.int32), torch.tensor([101, 101, 0], dtype=torch.int32)
    q, k, v, active, gain, starts, ends = (t.to(device) for t in (q, k, v, active, gain, starts, ends))
    out, lse = full_causal_attention(q, k, v, scaling=dim ** -0.5, kv_start=starts, kv_end=ends, backend=backend,
                                     head_gain=gain, active=active, return_lse=True)
    tol = 1e-4 if backend == "triton" else 1e-5
    for row in range(2):
        keys = slice(int(starts[row]), int(ends[row]))
        want, want_lse = full_causal_attention(q[row:row + 1], k[row:row + 1, :, keys], v[row:row + 1, :, keys],
                                               scaling=dim ** -0.5, kv_start=None, backend="torch",
                                               head_gain=gain[row:row + 1], active=active[row:row + 1],
                                               return_lse=True)
        assert (out[row] - want[0]).abs().max().item() < tol
        on = active[row, 0]
        assert (lse[row, on] - want_lse[0, on]).abs().max().item() < tol
    assert torch.equal(out[2], torch.zeros_like(out[2]))
