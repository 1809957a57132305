"""The generic trainer on a tiny random model: smoke runs of every shipped recipe, resume, load(adapter=...)."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

import patchattn
from patchattn.train import RecipeError, RunOptions, load_recipe, main, train, train_model

RECIPES = os.path.join(os.path.dirname(__file__), "..", "..", "recipes")
SMOKE = {"model": "tiny-llama", "steps": 3, "seq_len": 64, "eval_every": 0, "save_every": 0, "eval_chunks": 1,
         "warmup": 1}


def _recipe(name, tmp_path, **extra):
    overrides = {**SMOKE, "output_dir": str(tmp_path / name), **extra}
    recipe = load_recipe(os.path.join(RECIPES, name), overrides)
    if recipe.train.decode_eval:
        recipe.train.decode_eval = {"prefill": 32, "tokens": 8}
    return recipe


def _log(path):
    with open(os.path.join(path, "log.jsonl")) as handle:
        return [json.loads(line) for line in handle]


@pytest.mark.parametrize("name", ["moh", "longlora", "sinklora"])
def test_three_step_smoke_run_of_each_recipe(name, tmp_path):
    metrics = train(_recipe(name, tmp_path), RunOptions(progress=False))
    out = tmp_path / name
    steps = [row for row in _log(out) if "lm_loss" in row]
    assert [row["step"] for row in steps] == [1, 2, 3]
    assert all(math.isfinite(row["loss"]) and row["grad_norm"] > 0 for row in steps)
    for key in ("ppl_dense", "ppl_before", "ppl_after"):
        assert math.isfinite(metrics[key]) and metrics[key] > 1
    for file in ("adapter/adapter_model.safetensors", "patch.json", "patch_state.safetensors", "metrics.json",
                 "loss.png", "recipe.json"):
        assert (out / file).exists(), file
    state = load_file(str(out / "patch_state.safetensors"))
    if name == "moh":
        assert state and all(".patchattn." in k for k in state)
        assert all("aux_loss" in row for row in steps)
        assert metrics["ppl_before"] != metrics["ppl_dense"], "MoH switches heads off"
    else:
        assert not state  # S²-Attn / SF-Attn have no parameters of their own
        assert metrics["ppl_training_attention_before"] != metrics["ppl_dense"]
    if name == "longlora":
        assert metrics["ppl_before"] == metrics["ppl_dense"], "the inference patch is full attention"


def test_resume_continues_the_loss_curve_exactly(tmp_path):
    extra = {"steps": 4, "save_every": 2}
    train(_recipe("moh", tmp_path / "whole", **extra), RunOptions(progress=False))
    interrupted = _recipe("moh", tmp_path / "split", **extra)
    assert train(interrupted, RunOptions(progress=False, stop_after=2)) == {"stopped_at": 2}
    train(interrupted, RunOptions(progress=False, resume=True))
    whole = [r["loss"] for r in _log(tmp_path / "whole" / "moh") if "lm_loss" in r]
    split = [r["loss"] for r in _log(tmp_path / "split" / "moh") if "lm_loss" in r]
    assert len(whole) == len(split) == 4
    assert split == pytest.approx(whole, rel=1e-6, abs=1e-7)
    a = load_file(str(tmp_path / "whole" / "moh" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "split" / "moh" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize("name", ["moh", "sinklora"])
def test_load_with_adapter_reproduces_the_tuned_models_logits(name, tmp_path):
    recipe = _recipe(name, tmp_path, steps=2, lr=5e-2, decode_eval=None)
    _, tuned = train_model(recipe, RunOptions(progress=False))
    ids = torch.randint(3, 100, (2, 48))
    with torch.no_grad():
        want = tuned(input_ids=ids).logits
        model, _ = patchattn.load("tiny-llama", adapter=recipe.train.output_dir)
        assert torch.equal(model(input_ids=ids).logits, want)
        base, _ = patchattn.load("tiny-llama", adapter=recipe.train.output_dir, merge=True)
        assert torch.allclose(base(input_ids=ids).logits, want, atol=1e-4)
    if name == "sinklora":
        assert patchattn.get_handle(model.get_base_model()).config.kv_budget == 128


def test_recipe_errors_name_the_problem(tmp_path):
    longlora = os.path.join(RECIPES, "longlora")
    with pytest.raises(RecipeError, match="'stpes'.*did you mean 'steps'"):
        load_recipe(longlora, {"stpes": 3})
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(str(tmp_path / "nope"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "patch.json").write_text('{"method": "longlora", "group_ratio": 0.5}')
    (bad / "lora.json").write_text('{"r": 4, "target_module": ["q_proj"]}')
    (bad / "train.json").write_text('{"aux_loss": "os:system"}')
    with pytest.raises(RecipeError, match="group_ratio.*did you mean 'group_size_ratio'"):
        load_recipe(str(bad))
    (bad / "patch.json").write_text('{"method": "longlora"}')
    with pytest.raises(RecipeError, match="'target_module'.*did you mean 'target_modules'"):
        load_recipe(str(bad))
    (bad / "lora.json").write_text('{"r": 4}')
    with pytest.raises(RecipeError, match="unknown aux_loss 'os:system'"):
        load_recipe(str(bad))
    (bad / "train.json").write_text('{"model": "smolm2"}')
    (bad / "inferense.json").write_text("{}")
    with pytest.raises(RecipeError, match="did you mean 'inference.json'"):
        load_recipe(str(bad))
    os.remove(bad / "inferense.json")
    with pytest.raises(RecipeError, match="unknown model 'smolm2'; did you mean 'smollm2'"):
        train(load_recipe(str(bad), {"output_dir": str(tmp_path / "o")}), RunOptions(progress=False))
    assert main([str(tmp_path / "nope")]) == 2
