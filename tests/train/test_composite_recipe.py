"""The ``composite`` recipe: LoRA on a tiny LLaVA's text backbone under composite attention, with images in the
training data; 2 steps, then ``patchattn.load(adapter=...)`` reproduces the tuned model."""

import json
import math

import pytest
import torch

import patchattn
from patchattn.testing import tiny_inputs
from patchattn.train import RecipeError, RunOptions, load_recipe, train_model

SMOKE = {"steps": 2, "seq_len": 48, "eval_chunks": 1, "warmup": 1, "save_every": 0, "lr": 5e-2}


def test_two_steps_with_images_then_reload(tmp_path):
    recipe = load_recipe("composite", {**SMOKE, "output_dir": str(tmp_path / "run")})
    assert recipe.patch["method"] == "composite" and recipe.train.data["images"] == "synthetic"
    metrics, tuned = train_model(recipe, RunOptions(progress=False))
    lines = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if "lm_loss" in line]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    assert metrics["ppl_before"] != metrics["ppl_dense"], "held-out chunks carry an image: composite changes them"
    names = [n for n, p in tuned.named_parameters() if p.requires_grad]
    assert names and all("language_model" in n and "lora_" in n for n in names)  # the vision tower is left alone
    base = tuned.get_base_model()
    inputs = tiny_inputs(base, "llava", batch=2)
    with torch.no_grad():
        want = tuned(**inputs).logits
        model, _ = patchattn.load("tiny-llava", adapter=str(tmp_path / "run"))
        assert torch.allclose(model(**inputs).logits, want, atol=1e-6)
        assert patchattn.get_handle(model).config.method == "composite"


def test_images_need_a_llava_model(tmp_path):
    recipe = load_recipe("composite", {**SMOKE, "model": "tiny-llama", "output_dir": str(tmp_path / "x")})
    with pytest.raises(RecipeError, match="LLaVA models only"):
        train_model(recipe, RunOptions(progress=False, evaluate=False))
    with pytest.raises(RecipeError, match="data.images"):
        load_recipe("composite", {"data": {"text": "pydoc", "images": 3}})
