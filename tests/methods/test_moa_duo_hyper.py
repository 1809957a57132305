"""moa, duo and hyper: their artifacts (JSON only, validated), per-head patterns, and hyper's LSH selection.

The generic block-sparse tests (dense equivalence, decode, padding, gradients) cover them in test_sparse_methods.
"""

import json
import pickle
import types

import pytest
import torch

import patchattn
from patchattn.calibrate import artifact, save_json, shipped
from patchattn.kernels.dense import sdpa_attention
from patchattn.masks import BlockGeometry, causal_allowed
from patchattn.methods import duo, hyper, moa
from patchattn.state import PatchContext, PatchState
from patchattn.testing import max_abs_diff, tiny_model

SMOLLM2 = types.SimpleNamespace(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                                vocab_size=49152)


def _write(tmp_path, model, payload, rows, name="artifact.json"):
    return str(save_json(artifact("tiny", model.config, payload, rows, {}), tmp_path / name))


def _state(method, layer=0, **overrides):
    return PatchState(patchattn.get_config(method, **overrides), layer, "text", PatchContext())


# ---- artifacts ---------------------------------------------------------------------------------------------------
def test_moa_plan_round_trip_and_use(tmp_path):
    model = tiny_model("llama")  # 2 layers, 4 query heads
    rules = [[[16.0, 0.0], [0.0, 0.5], [32.0, 0.25], [0.0, 1.0]], [[8.0, 0.1]] * 4]
    path = _write(tmp_path, model, "rules", rules)
    assert moa.load_plan(path)["rules"] == rules
    with patchattn.patched(model, "moa", plan=path, block_size=16):
        assert model.model.layers[0].self_attn.patchattn.method_state.rules.tolist() == rules[0]
        out = model(input_ids=torch.randint(3, 100, (1, 100))).logits
    assert torch.isfinite(out).all()


def test_artifact_with_wrong_shape_is_refused_naming_the_difference(tmp_path):
    model = tiny_model("llama")
    path = _write(tmp_path, model, "rules", [[[0.0, 0.5]] * 4] * 2)
    data = json.loads(open(path).read())
    data.update(num_heads=3, rules=[[[0.0, 0.5]] * 3] * 2)
    open(path, "w").write(json.dumps(data))
    with pytest.raises(ValueError, match="num_heads: MoA plan has 3, model has 4"):
        patchattn.patch(model, "moa", plan=path)
    data["rules"] = [[[0.0, 0.5]] * 3]  # inconsistent with its own num_layers
    open(path, "w").write(json.dumps(data))
    with pytest.raises(ValueError, match=r"\[2\]\[3\] nested list"):
        patchattn.get_config("moa", plan=path)
    scores = _write(tmp_path, model, "scores", [[0.1] * 4] * 3, "scores.json")  # 3 layers in a 2-layer model
    data = json.loads(open(scores).read())
    data["num_layers"] = 3
    open(scores, "w").write(json.dumps(data))
    with pytest.raises(ValueError, match="num_layers: retrieval scores has 3, model has 2"):
        patchattn.patch(model, "duo", scores=scores)


def test_unknown_artifact_name_lists_the_shipped_ones():
    with pytest.raises(ValueError, match="shipped: smollm2"):
        patchattn.get_config("moa", plan="no_such_plan")
    with pytest.raises(ValueError, match=r"shipped: .*\bsmollm2_retrieval\b"):
        patchattn.get_config("duo", scores="no_such_scores")


class _Trap:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


def test_artifacts_are_never_unpickled_or_executed(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "plan.json"
    path.write_bytes(pickle.dumps(_Trap(str(marker))))
    with pytest.raises(ValueError, match="not valid JSON"):
        patchattn.get_config("moa", plan=str(path))
    path.write_text("__import__('os').system('touch %s')" % marker)
    with pytest.raises(ValueError, match="not valid JSON"):
        patchattn.get_config("duo", scores=str(path))
    assert not marker.exists()


def test_shipped_artifacts_fit_smollm2():
    assert "smollm2" in shipped("rules") and "smollm2_retrieval" in shipped("scores")
    plan = moa.load_plan("smollm2")
    assert (plan["num_layers"], plan["num_heads"]) == (30, 9)
    assert duo.model_scores(patchattn.get_config("duo"), SMOLLM2).shape == (30, 9)  # 'auto' finds the shipped file


# ---- moa ---------------------------------------------------------------------------------------------------------
def test_moa_windows_grow_with_length_as_the_rule_says():
    rules = torch.tensor([[64.0, 0.25], [64.0, 0.0]])
    assert moa.head_windows(rules, 1024) == [320, 64]
    assert moa.head_windows(rules, 4096) == [1088, 64]
    state = _state("moa", sink_blocks=0)
    state.method_state.rules = rules
    q = torch.zeros(1, 2, 1, 8)  # a decode query at the end: its lists' counts show the window in blocks
    blocks = {n: moa.select_windows(BlockGeometry(1, n, 64, 64), q, q, state)[1].flatten().tolist()
              for n in (1024, 4096)}
    assert blocks[1024] == [6, 2] and blocks[4096] == [18, 2]  # ceil(window / 64) + 1 partial block; fixed head stays


def test_moa_uniform_plan_reads_about_its_density():
    g = BlockGeometry(8192, 8192, 64, 64)
    state = _state("moa", density=0.5, sink_blocks=0)
    mask = moa.select_windows(g, torch.zeros(1, 2, 1, 8), torch.zeros(1, 1, 1, 8), state)
    assert mask.float().sum() / (2 * causal_allowed(g).sum()) == pytest.approx(0.5, abs=0.02)


# ---- duo ---------------------------------------------------------------------------------------------------------
def _attend(module, method_forward, q, k, v):
    out, _ = method_forward(module, q, k, v, None, scaling=q.shape[-1] ** -0.5)
    return out  # [B, T, H, D]


def test_duo_keeps_full_attention_exactly_on_retrieval_heads(tmp_path):
    model = tiny_model("llama")  # 2 layers x 4 heads; retrieval heads: (0, 2) and (1, 1)
    scores = _write(tmp_path, model, "scores", [[0.0, 0.1, 0.9, 0.0], [0.0, 0.8, 0.0, 0.2]])
    q, k, v = torch.randn(1, 4, 128, 16), torch.randn(1, 2, 128, 16), torch.randn(1, 2, 128, 16)
    for layer, retrieval in ((0, 2), (1, 1)):
        module = model.model.layers[layer].self_attn
        with patchattn.patched(model, "duo", scores=scores, retrieval_fraction=0.25, window=16, sink_tokens=16,
                               block_size=16, kv_heads_together=False):  # per query head
            sparse = _attend(module, duo.duo_attention, q, k, v)
        dense = sdpa_attention(module, q, k, v, None, scaling=16 ** -0.5)[0]
        with patchattn.patched(model, "streaming", window=16, sink_tokens=16, block_size=16):
            streaming = _attend(module, patchattn.registry.get_spec("streaming").forward, q, k, v)
        for head in range(4):
            expected = dense if head == retrieval else streaming
            assert max_abs_diff(sparse[:, :, head], expected[:, :, head]) <= 1e-6, (layer, head)
        assert max_abs_diff(streaming[:, :, retrieval], dense[:, :, retrieval]) > 1e-3


def test_duo_kv_heads_together_makes_whole_groups_full(tmp_path):
    """DuoAttention's GQA rule: a KV head ranks by its best query head, and its whole group is full or streaming;
    the lists are per KV head (the group shares them), at prefill and while decoding."""
    model = tiny_model("llama")  # 2 layers x 4 heads, 2 KV heads (groups of 2)
    scores = _write(tmp_path, model, "scores", [[0.0, 0.1, 0.9, 0.0], [0.0, 0.8, 0.0, 0.2]])
    q, k, v = torch.randn(1, 4, 128, 16), torch.randn(1, 2, 128, 16), torch.randn(1, 2, 128, 16)
    options = dict(scores=scores, retrieval_fraction=0.5, window=16, sink_tokens=16, block_size=16)
    module = model.model.layers[0].self_attn
    with patchattn.patched(model, "duo", kv_heads_together=True, **options):
        # KV heads ranked by their best query head: layer 0 (0.1, 0.9), layer 1 (0.8, 0.2): the top half
        assert [layer.self_attn.patchattn.method_state.retrieval.tolist() for layer in model.model.layers] == [
            [False, True], [True, False]]
        sparse = _attend(module, duo.duo_attention, q, k, v)
        state = module.patchattn
        lists = duo.select_duo(BlockGeometry(1, 128, 16, 16), q[:, :, -1:], k, state)
        counts = lists[1].flatten().tolist()
        assert lists[0].shape[1] == 2 and counts[0] < 8 and counts[1] == 8  # sink + window | every block
    dense = sdpa_attention(module, q, k, v, None, scaling=16 ** -0.5)[0]
    with patchattn.patched(model, "streaming", window=16, sink_tokens=16, block_size=16):
        streaming = _attend(module, patchattn.registry.get_spec("streaming").forward, q, k, v)
    for head, expected in enumerate((streaming, streaming, dense, dense)):  # group 1 = query heads 2, 3
        assert max_abs_diff(sparse[:, :, head], expected[:, :, head]) <= 1e-6, head


def test_duo_ranks_heads_globally_and_warns_without_scores():
    scores = torch.tensor([[0.1, 0.9], [0.5, 0.5]])
    assert duo.retrieval_heads(scores, 0.5).tolist() == [[False, True], [True, False]]  # ties: earlier head
    with pytest.warns(UserWarning, match="calibrate.retrieval_heads"):
        chosen = duo.model_scores(patchattn.get_config("duo"), tiny_model("llama").config)
    assert duo.retrieval_heads(chosen, 0.25).tolist() == [[True, True, False, False], [False] * 4]


# ---- hyper -------------------------------------------------------------------------------------------------------
def test_gray_ranks_put_one_bit_neighbours_next_to_each_other():
    rank = hyper.gray_rank(5)
    code_at = torch.empty_like(rank)
    code_at[rank] = torch.arange(32)
    flips = code_at[1:] ^ code_at[:-1]
    assert ((flips & (flips - 1)) == 0).all() and sorted(rank.tolist()) == list(range(32))


def test_hyper_lsh_is_deterministic_per_seed_and_layer():
    g = BlockGeometry(512, 512, 64, 64)
    q, k = torch.randn(1, 4, 512, 16), torch.randn(1, 2, 512, 16)
    overrides = dict(min_seq_len=0, lsh_blocks=2, sample_size=64)
    first = hyper.select_hyper(g, q, k, _state("hyper", **overrides))
    state = _state("hyper", **overrides)
    assert torch.equal(first, hyper.select_hyper(g, q, k, state))
    assert torch.equal(hyper.select_hyper(g, q, k, state), first)  # and again on the same state
    # The hyperplanes live in the typed state, follow the module's device and stay out of state_dict.
    assert state.method_state.projections is not None and not state.state_dict()
    assert state.to(torch.float64).method_state.projections.dtype == torch.float64
    other = _state("hyper", layer=1, **overrides)
    hyper.select_hyper(g, q, k, other)
    assert not torch.equal(other.method_state.projections.double(), state.method_state.projections)


def test_hyper_reads_the_block_holding_keys_identical_to_the_queries():
    g = BlockGeometry(1024, 1024, 64, 64)
    direction = torch.randn(16)
    q = direction + 0.01 * torch.randn(1, 2, 1024, 16)
    k = torch.randn(1, 1, 1024, 16)
    k[:, :, 5 * 64: 6 * 64] = direction  # block 5 holds the keys identical to (almost all) queries
    state = _state("hyper", min_seq_len=0, lsh_blocks=1, sample_size=0, local_blocks=1, sink_blocks=0)
    mask = hyper.select_hyper(g, q, k, state)
    assert mask[0, :, 6:, 5].all(), "every later query block must read block 5"
    assert (mask[0].sum(-1) <= 2).all()  # its one LSH block + the diagonal


def test_hyper_samples_blocks_and_runs_dense_below_min_seq_len():
    g = BlockGeometry(1024, 1024, 64, 64)
    q, k = torch.randn(1, 2, 1024, 16), torch.randn(1, 2, 1024, 16)
    dense = hyper.select_hyper(g, q, k, _state("hyper"))  # 1024 < min_seq_len 4096
    assert torch.equal(dense, causal_allowed(g))
    sampled = hyper.select_hyper(g, q, k, _state("hyper", min_seq_len=0, lsh_blocks=0, sample_size=128))
    counts = sampled[0].sum(-1)  # sink + 2 local + 2 sampled where the past is long enough
    assert (counts[:, 8:] == 5).all() and (sampled[0] <= causal_allowed(g)).all()
