"""DiT distillation on tiny random DiTs: the student (patch + LoRA) moves towards its own dense teacher, the teacher
is the base model exactly, the artifacts reload to the same outputs, and the ``clear`` recipe (run when ``clear`` is
registered)."""

import json
import math
import os
import shutil

import pytest
import torch

pytest.importorskip("diffusers")

import patchattn
from patchattn import api
from patchattn.dit_models import TINY_DITS, tiny_dit
from patchattn.eval.drift import cosine, drift, psnr
from patchattn.registry import all_specs
from patchattn.train import RecipeError, RunOptions, load_recipe, main, train, train_model
from patchattn.train.dit import (
    HELDOUT_STREAM,
    TRAIN_STREAM,
    make_batch,
    output_of,
    shapes_of,
    teacher_output,
    wrap_dit_lora,
)
from patchattn.train.dit_inputs import synthetic_inputs
from patchattn.train.recipe import SHIPPED

CLEAR = SHIPPED / "clear"
# gna with a 3x3 neighborhood: sparse on these grids, so the student starts away from the teacher
GNA = {"method": "gna", "window": [1, 3, 3]}
SMOKE = {"steps": 5, "lr": 3e-3, "batch": 2, "grad_accum": 1, "eval_batches": 2, "save_every": 0, "n_text": 5}
GRIDS = {"flux": [1, 8, 8], "wan": [2, 6, 6]}
FAST = RunOptions(progress=False)


def _gna_recipe(tmp_path, family, patch=None, **extra):
    """The clear recipe's lora.json and train.json with a gna patch: the trainer takes the method from the recipe."""
    folder = tmp_path / "recipe"
    if not folder.exists():
        shutil.copytree(CLEAR, folder)
        (folder / "patch.json").write_text(json.dumps(patch or GNA))
    overrides = {**SMOKE, "model": f"tiny-{family}", "grid": GRIDS[family],
                 "output_dir": str(tmp_path / f"out-{family}"), **extra}
    return load_recipe(str(folder), overrides)


def _log(path):
    with open(os.path.join(path, "log.jsonl")) as handle:
        return [json.loads(line) for line in handle]


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_distillation_moves_the_student_towards_its_dense_teacher(family, tmp_path):
    recipe = _gna_recipe(tmp_path, family)
    metrics, tuned = train_model(recipe, FAST)
    out = recipe.train.output_dir
    steps = _log(out)
    assert [row["step"] for row in steps] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(row["distill_loss"]) and row["grad_norm"] > 0 for row in steps)
    before, after = metrics["drift_before"], metrics["drift_after"]
    assert before["mse"] > 0 and before["samples"] == 4, "gna 3x3 must not be dense on this grid"
    # held-out batches of the training distribution (another seed stream): the drift went down
    assert after["mse"] < before["mse"]
    assert after["cosine"] > before["cosine"] and after["psnr_db"] > before["psnr_db"]
    # the loss of step 1's batch (logged before any update) is lower with the tuned weights
    base = tuned.get_base_model()
    shapes = shapes_of(base, recipe.train)
    first = make_batch(base, recipe.train, shapes, TRAIN_STREAM, 0, torch.device("cpu"))
    with torch.no_grad():
        tuned.train()
        now = torch.nn.functional.mse_loss(output_of(tuned, first), teacher_output(tuned, first)).item()
    assert now < steps[0]["distill_loss"]
    for file in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "patch.json",
                 "patch_state.safetensors", "recipe.json", "metrics.json", "log.jsonl", "loss.png"):
        assert os.path.exists(os.path.join(out, file)), file
    with open(os.path.join(out, "patch.json")) as handle:
        assert json.load(handle)["inference"] == GNA
    assert "not image/video quality" in metrics["drift_note"]


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_load_with_adapter_reproduces_the_tuned_transformer(family, tmp_path):
    recipe = _gna_recipe(tmp_path, family, steps=2, eval_batches=0)
    _, tuned = train_model(recipe, FAST)
    base = tuned.get_base_model()
    inputs = make_batch(base, recipe.train, shapes_of(base, recipe.train), HELDOUT_STREAM, 7, torch.device("cpu"))
    with torch.no_grad():
        tuned.eval()
        want = output_of(tuned, inputs)
        dense = output_of(tiny_dit(family), inputs)
        assert not torch.allclose(want, dense, atol=1e-6), "the tuned student must differ from the dense model"
        model, tokenizer = patchattn.load(None, adapter=recipe.train.output_dir)
        assert tokenizer is None and not model.training
        assert patchattn.get_handle(model.get_base_model()).method == "gna"
        assert torch.equal(output_of(model, inputs), want)
        merged, _ = patchattn.load(f"tiny-{family}", adapter=recipe.train.output_dir, merge=True)
        assert torch.allclose(output_of(merged, inputs), want, atol=1e-5)


def test_the_teacher_is_the_base_model_and_the_patch_comes_back(tmp_path):
    recipe = _gna_recipe(tmp_path, "flux")
    transformer = tiny_dit("flux")
    api.apply_patch(transformer, recipe.patch)
    states = [m.patchattn for m in transformer.modules() if hasattr(m, "patchattn")]
    model = wrap_dit_lora(transformer, recipe.lora)
    with torch.no_grad():  # a LoRA that does something, so disabling it matters
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    inputs = make_batch(transformer, recipe.train, shapes_of(transformer, recipe.train), TRAIN_STREAM, 0, "cpu")
    oracle = output_of(tiny_dit("flux"), inputs)  # an independent, never patched copy of the same weights
    with torch.no_grad():
        assert torch.equal(teacher_output(model, inputs), oracle)
        student = output_of(model, inputs)
    assert not torch.allclose(student, oracle, atol=1e-4)
    assert patchattn.get_handle(transformer).method == "gna"
    assert [m.patchattn for m in transformer.modules() if hasattr(m, "patchattn")] == states  # same objects


def test_a_dense_equivalent_patch_has_no_drift_and_learns_nothing(tmp_path):
    recipe = _gna_recipe(tmp_path, "wan", patch={"method": "gna", "window_fraction": 1.0}, steps=2, eval_batches=1)
    metrics = train(recipe, FAST)
    assert metrics["drift_before"]["mse"] == 0 and metrics["drift_before"]["psnr_db"] == math.inf
    assert metrics["drift_before"]["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert all(row["distill_loss"] == 0 for row in _log(recipe.train.output_dir))
    assert metrics["drift_after"] == metrics["drift_before"]


def test_resume_continues_the_distillation_exactly(tmp_path):
    whole = _gna_recipe(tmp_path / "a", "wan", steps=4, eval_batches=0, save_every=2)
    train(whole, FAST)
    split = _gna_recipe(tmp_path / "b", "wan", steps=4, eval_batches=0, save_every=2)
    assert train(split, RunOptions(progress=False, stop_after=2)) == {"stopped_at": 2}
    train(split, RunOptions(progress=False, resume=True))
    a = [r["distill_loss"] for r in _log(whole.train.output_dir)]
    b = [r["distill_loss"] for r in _log(split.train.output_dir)]
    assert len(a) == len(b) == 4 and b == pytest.approx(a, rel=1e-6, abs=1e-12)


def test_drift_metrics_against_hand_computed_values():
    teacher = torch.tensor([[-1.0, 0.0, 1.0, 0.5], [4.0, 0.0, 0.0, 0.0]])
    assert cosine(2 * teacher, teacher).tolist() == pytest.approx([1.0, 1.0])
    assert cosine(-teacher, teacher).tolist() == pytest.approx([-1.0, -1.0])
    # range 2 and mse 0.01: 10 log10(4 / 0.01); range 4 and mse 0.04: 10 log10(16 / 0.04)
    shifted = teacher + torch.tensor([[0.1], [0.2]])
    assert psnr(shifted, teacher).tolist() == pytest.approx([10 * math.log10(400), 10 * math.log10(400)])
    assert psnr(teacher, teacher).tolist() == [math.inf, math.inf]
    summary = drift(lambda x: x["v"] + 0.1, lambda x: x["v"], [{"v": teacher}, {"v": teacher}])
    assert summary["mse"] == pytest.approx(0.01) and summary["samples"] == 4
    assert summary["psnr_db"] == pytest.approx((10 * math.log10(400) + 10 * math.log10(16 / 0.01)) / 2)


def test_dit_recipe_errors_name_the_problem(tmp_path):
    folder = tmp_path / "recipe"
    shutil.copytree(CLEAR, folder)
    (folder / "patch.json").write_text(json.dumps(GNA))
    with pytest.raises(RecipeError, match="'seq_len'.*Valid fields: kind"):
        load_recipe(str(folder), {"seq_len": 64})
    with pytest.raises(RecipeError, match="grid must be"):
        load_recipe(str(folder), {"grid": [8, 8]})
    with pytest.raises(RecipeError, match="kind must be 'dit_distill'"):
        load_recipe(str(folder), {"kind": "dit"})
    with pytest.raises(RecipeError, match="timestep_range"):
        load_recipe(str(folder), {"timestep_range": [0.5, 0.1]})
    with pytest.raises(RecipeError, match="names no model: give one with --model"):  # the shipped clear has none
        train(load_recipe(str(folder), {"output_dir": str(tmp_path / "o")}), FAST)
    with pytest.raises(RecipeError, match="unknown DiT 'tiny-flx'; did you mean 'tiny-flux'"):
        train(load_recipe(str(folder), {"model": "tiny-flx", "output_dir": str(tmp_path / "o")}), FAST)
    with pytest.raises(RecipeError, match="image model: the grid's frames must be 1"):
        train(load_recipe(str(folder), {"model": "tiny-flux", "grid": [2, 4, 4], "output_dir": str(tmp_path / "o")}),
              FAST)


def test_cli_runs_a_dit_recipe_folder(tmp_path, capsys):
    folder = tmp_path / "recipe"
    shutil.copytree(CLEAR, folder)
    (folder / "patch.json").write_text(json.dumps(GNA))
    out = tmp_path / "run"
    assert main([str(folder), "--model", "tiny-wan", "--steps", "1", "--output", str(out), "--no-progress",
                 "--set", "grid=[2, 6, 6]", "--set", "n_text=5", "--set", "batch=1", "--set", "grad_accum=1",
                 "--set", "eval_batches=1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 1 and metrics["grid"] == [2, 6, 6] and "drift_after" in metrics


# ---- the clear recipe -------------------------------------------------------------------------------------------
def test_the_clear_recipe_trains_clear_on_flux_latents():
    patch = json.loads((CLEAR / "patch.json").read_text())
    train_json = json.loads((CLEAR / "train.json").read_text())
    assert patch["method"] == "clear"
    assert train_json["kind"] == "dit_distill" and train_json["grid"] == [1, 64, 64] and train_json["n_text"] == 512
    assert json.loads((CLEAR / "lora.json").read_text())["target_modules"] == ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.mark.skipif("clear" not in {s.name for s in all_specs()}, reason="method 'clear' is not registered")
def test_clear_recipe_distils_a_tiny_flux(tmp_path):
    # the recipe's own LoRA and learning rate; 3 steps of 2 samples on a 40x40 grid
    recipe = load_recipe("clear", {"model": "tiny-flux", "grid": [1, 40, 40], "n_text": 5, "batch": 2,
                                   "grad_accum": 1, "steps": 3, "eval_batches": 2, "save_every": 0,
                                   "output_dir": str(tmp_path / "clear")})
    metrics, tuned = train_model(recipe, FAST)
    assert metrics["drift_before"]["mse"] > 0, "clear's defaults must be sparse on a 40x40 grid"
    assert metrics["drift_after"]["mse"] < metrics["drift_before"]["mse"]
    base = tuned.get_base_model()
    inputs = make_batch(base, recipe.train, shapes_of(base, recipe.train), HELDOUT_STREAM, 3, torch.device("cpu"))
    with torch.no_grad():
        tuned.eval()
        model, _ = patchattn.load(None, adapter=recipe.train.output_dir)
        assert torch.equal(output_of(model, inputs), output_of(tuned, inputs))


@pytest.mark.parametrize("family", sorted(TINY_DITS))
def test_synthetic_inputs_sit_on_the_requested_grid_of_every_family(family):
    """The adapter reads back the grid and text length the inputs were built for (its own, independent reader)."""
    transformer = tiny_dit(family)
    handle = patchattn.patch(transformer, "gna", targets="all")
    grid, n_text = TINY_DITS[family].grid, TINY_DITS[family].n_text
    inputs = synthetic_inputs(transformer, grid, n_text, 2, torch.Generator().manual_seed(0), (0.25, 0.75))
    with torch.no_grad():
        out = output_of(transformer, inputs)
    extras = handle.record.context.extras
    assert extras["grid"] == grid and extras["n_image"] == math.prod(grid) and extras["n_text"] == n_text
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    t = inputs["timestep"].float()
    scale = 1.0 if family == "flux" else 1000.0
    assert ((t >= 0.25 * scale - 0.5) & (t <= 0.75 * scale + 0.5)).all()
    again = synthetic_inputs(transformer, grid, n_text, 2, torch.Generator().manual_seed(0), (0.25, 0.75))
    assert all(torch.equal(inputs[k], again[k]) for k in inputs if isinstance(inputs[k], torch.Tensor))
