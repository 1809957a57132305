"""Calibration commands end to end on a tiny random model saved with save_pretrained (no tokenizer: seeded ids)."""

import json

import pytest
import torch

import patchattn
from patchattn import calibrate
from patchattn.calibrate import moa as calibrate_moa
from patchattn.calibrate import retrieval_heads
from patchattn.testing import tiny_model


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "llama"
    tiny_model("llama").save_pretrained(path)
    return str(path)


def test_moa_command_writes_a_plan_the_method_loads(saved_model, tmp_path):
    out = tmp_path / "plan.json"
    assert calibrate.main(["moa", "--model", saved_model, "--out", str(out), "--lengths", "64,128",
                           "--samples", "1", "--block-size", "16", "--density", "0.6"]) == 0
    plan = json.loads(out.read_text())
    assert (plan["num_layers"], plan["num_heads"]) == (2, 4) and plan["meta"]["density_budget"] == 0.6
    model = tiny_model("llama")
    with patchattn.patched(model, "moa", plan=str(out), block_size=16):
        assert torch.isfinite(model(input_ids=torch.randint(3, 100, (1, 128))).logits).all()


def test_moa_head_floor_keeps_every_head_above_a_fraction_of_the_budget(saved_model, tmp_path):
    from patchattn.masks import BlockGeometry, causal_allowed, sink_and_window
    from patchattn.methods.moa import head_windows

    out = tmp_path / "plan.json"
    assert calibrate.main(["moa", "--model", saved_model, "--out", str(out), "--lengths", "64,128", "--samples", "1",
                           "--block-size", "16", "--density", "0.4", "--head-floor", "0.75"]) == 0
    plan = json.loads(out.read_text())
    assert plan["meta"]["head_floor"] == 0.75
    for n in (64, 128):
        g = BlockGeometry(n, n, 16, 16)
        allowed = causal_allowed(g).sum()
        for layer in plan["rules"]:
            for w in head_windows(torch.tensor(layer), n):
                assert sink_and_window(g, 16, w).sum() / allowed >= 0.75 * 0.4 - 1e-6


def test_moa_allocation_meets_the_budget_and_prefers_low_loss():
    # Two heads, three rules of density 0.2 / 0.5 / 0.8: head 0 loses a lot when narrow, head 1 nothing.
    loss = torch.tensor([[[10.0, 1.0, 0.0], [0.1, 0.05, 0.0]]])
    density = torch.tensor([[0.2, 0.5, 0.8]])
    choice = calibrate_moa.allocate(loss, density, budget=0.5)
    assert choice.tolist() == [[2, 0]]  # the sensitive head gets the wide window, the mean density is 0.5


def test_moa_influence_is_the_papers_formula():
    a = torch.tensor([[0.5, 0.25, 0.25]])
    g = torch.tensor([[1.0, 0.0, 0.0]])
    # masking entry 0: row renormalises to [0, .5, .5]; first-order loss change -A0 (G0 - sum A G) / (1 - A0)
    assert calibrate_moa.influence(a, g)[0, 0].item() == pytest.approx(-0.5 * (1 - 0.5) / 0.5)


def test_retrieval_heads_command_writes_scores_duo_loads(saved_model, tmp_path):
    out = tmp_path / "scores.json"
    assert retrieval_heads.main(["--model", saved_model, "--out", str(out), "--lengths", "96", "--depths", "2",
                                 "--needles", "1", "--min-recall", "0"]) == 0
    scores = json.loads(out.read_text())
    assert len(scores["scores"]) == 2 and len(scores["scores"][0]) == 4
    assert all(0.0 <= s <= 1.0 for row in scores["scores"] for s in row)
    model = tiny_model("llama")
    with patchattn.patched(model, "duo", scores=str(out), block_size=16, window=16):
        assert torch.isfinite(model(input_ids=torch.randint(3, 100, (1, 96))).logits).all()


def test_retrieval_score_credits_copying_from_the_needle_only():
    episode = retrieval_heads.Episode(torch.tensor([[9, 1, 2, 3, 4, 9]]), (1, 5), [3, 4])
    tokens = [3, 4]
    # [L=1, H=3] top-1 positions per step: head 0 copies from the needle, head 1 looks at the right token outside
    # the needle (never), head 2 looks inside the needle at the wrong token.
    tops = [torch.tensor([[3, 0, 1]]), torch.tensor([[4, 5, 2]])]
    score = retrieval_heads.episode_scores(episode, tokens, tops)
    assert score.tolist() == [[0.5, 0.0, 0.0]]  # 2 hits / |needle| = 4


def test_needle_episodes_are_seeded_and_hold_the_needle():
    first = retrieval_heads.needle_episode(None, 128, 200, 0.5, seed=3, offset=0)
    again = retrieval_heads.needle_episode(None, 128, 200, 0.5, seed=3, offset=0)
    assert torch.equal(first.input_ids, again.input_ids) and first.needle == again.needle
    start, end = first.needle
    assert first.input_ids[0, start:end].tolist()[-len(first.answer):] == first.answer
    assert abs(first.input_ids.shape[1] - 200) <= 1


def test_unknown_command_is_refused():
    assert calibrate.main(["nope"]) == 2
