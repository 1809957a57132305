"""FSDP2 and DDP through ``accelerate launch`` with the shipped configs (two gloo processes on CPU, tiny-llama).

FSDP2 must train exactly as DDP does (same rows per process, gradients averaged over the processes: only the
summation order differs), save the LoRA weights and the patch's own parameters (``moh``'s routers, sharded like the
LoRA weights during training) whole, and ``patchattn.load(None, adapter=...)`` in one process must give the logits
the sharded model itself produced at the end of training (recorded by ``fsdp_probe.py``)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import patchattn
from patchattn.train import parallel
from patchattn.train.recipe import RecipeError

from .launch import ACCELERATE, CONFIGS, accelerate, log, saved_weights, train_args

PROBE = os.path.join(os.path.dirname(__file__), "fsdp_probe.py")


@pytest.mark.skipif(ACCELERATE is None, reason="accelerate's launcher not on PATH")
def test_fsdp2_trains_as_ddp_and_its_adapter_reproduces_the_sharded_models_logits(tmp_path):
    probe = tmp_path / "probe.safetensors"
    fsdp_out, ddp_out = tmp_path / "fsdp2", tmp_path / "ddp"
    accelerate("fsdp2", 2, PROBE, str(probe), *train_args("moh", fsdp_out, 3, "--set", "batch=1"))
    accelerate("ddp", 2, "-m", "patchattn.train", *train_args("moh", ddp_out, 3, "--set", "batch=1"))

    with open(fsdp_out / "metrics.json") as handle:
        metrics = json.load(handle)
    assert (metrics["parallel"], metrics["processes"]) == ("fsdp2", 2)
    fsdp_rows, ddp_rows = log(fsdp_out), log(ddp_out)
    assert [r["step"] for r in fsdp_rows] == [1, 2, 3]  # one writer
    for a, b in zip(fsdp_rows, ddp_rows, strict=True):
        for key in ("lm_loss", "aux_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key

    fsdp_weights, ddp_weights = saved_weights(fsdp_out), saved_weights(ddp_out)
    assert fsdp_weights.keys() == ddp_weights.keys()
    assert any(".patchattn." in name for name in fsdp_weights)  # the routers were saved with the adapter
    checkpointed = load_file(fsdp_out / "checkpoints" / "step-000003" / "trainable.safetensors")
    routers = {k.removeprefix("base_model.model."): v for k, v in checkpointed.items() if ".patchattn." in k}
    assert routers.keys() == {k.removeprefix("patch:") for k in fsdp_weights if k.startswith("patch:")}
    for name, value in routers.items():  # the checkpoint (gathered from the shards) holds what the run saved
        torch.testing.assert_close(value, fsdp_weights[f"patch:{name}"], rtol=0, atol=0)
    for name, value in fsdp_weights.items():
        torch.testing.assert_close(value, ddp_weights[name], rtol=1e-5, atol=1e-6, msg=name)

    model, _ = patchattn.load(None, adapter=str(fsdp_out))
    recorded = load_file(probe)
    with torch.no_grad():
        logits = model(input_ids=recorded["ids"]).logits
    torch.testing.assert_close(logits, recorded["logits"], rtol=1e-5, atol=1e-5)
    # the check can fail: without the adapter (LoRA off) the same patched model gives other logits
    with torch.no_grad(), model.disable_adapter():
        assert not torch.allclose(model(input_ids=recorded["ids"]).logits, recorded["logits"], atol=1e-4)


def test_launch_mode_reads_the_accelerate_config(monkeypatch):
    for name in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_RESHARD_AFTER_FORWARD", "ACCELERATE_MIXED_PRECISION",
                 *parallel.UNSUPPORTED_FSDP):
        monkeypatch.delenv(name, raising=False)
    assert parallel.launch_mode(1).kind == "single"
    assert parallel.launch_mode(2).kind == "ddp"  # torchrun, or accelerate's MULTI_GPU / MULTI_CPU
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    assert parallel.launch_mode(2) == parallel.ParallelMode("fsdp2", reshard_after_forward=False)
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(RecipeError, match="fsdp_version: 2"):
        parallel.launch_mode(2)
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(RecipeError, match="fsdp_offload_params"):
        parallel.launch_mode(2)
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "false")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(RecipeError, match="mixed_precision"):
        parallel.launch_mode(2)


def test_shipped_configs_name_the_modes_the_trainer_reads():
    import yaml

    ddp = yaml.safe_load((CONFIGS / "ddp.yaml").read_text())
    fsdp2 = yaml.safe_load((CONFIGS / "fsdp2.yaml").read_text())
    assert ddp["distributed_type"] == "MULTI_GPU"
    assert fsdp2["distributed_type"] == "FSDP" and fsdp2["fsdp_config"]["fsdp_version"] == 2
    assert not any(fsdp2["fsdp_config"].get(key, False) for key in parallel.UNSUPPORTED_FSDP.values())
    assert fsdp2["mixed_precision"] == "no"


def test_a_dit_recipe_refuses_several_processes(monkeypatch, tmp_path):
    from patchattn.train import load_recipe, train

    monkeypatch.setenv("WORLD_SIZE", "2")
    recipe = load_recipe("clear", {"model": "tiny-flux", "steps": 1, "output_dir": str(tmp_path)})
    with pytest.raises(RecipeError, match="one process"):
        train(recipe)
