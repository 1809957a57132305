"""Resuming on another number of processes: checkpoints hold whole tensors (gathered from FSDP2 shards), so a run
stopped after step 2 of 4 with two FSDP2 processes (batch 1 each) and resumed on ONE process with batch 2 (the same
rows per step, ``train/data.first_row``) ends with the adapter and routers of the uninterrupted two-process run.

Equal up to float summation order, not bitwise: one process sums the gradient of both rows in one backward, two
processes average two backwards.  ``aux_weight=0`` here: MoH's load-balance loss is computed over each process's
own rows, so with it the split of a step's rows over processes changes the loss itself (by ~1e-4 on tiny-llama), a
property of data parallelism rather than of the checkpoint."""

import os

import pytest
import torch
from safetensors.torch import load_file

from .launch import ACCELERATE, accelerate, log, one_process, saved_weights, train_args

STEPS, STOP = 4, 2
NO_AUX = ("--set", "aux_weight=0", "--set", "save_every=2")


@pytest.mark.skipif(ACCELERATE is None, reason="accelerate's launcher not on PATH")
def test_fsdp2_checkpoint_of_two_processes_resumes_on_one(tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    two = ("--set", "batch=1", *NO_AUX)
    accelerate("fsdp2", 2, "-m", "patchattn.train", *train_args("moh", whole, STEPS, *two))
    accelerate("fsdp2", 2, "-m", "patchattn.train", *train_args("moh", resumed, STEPS, *two, "--stop-after", str(STOP)))
    assert not (resumed / "adapter").exists()
    stopped = load_file(resumed / "checkpoints" / f"step-{STOP:06d}" / "optimizer.safetensors")
    assert stopped  # AdamW's moments, gathered whole
    out = one_process(*train_args("moh", resumed, STEPS, "--set", "batch=2", *NO_AUX, "--resume"))
    assert f"step {STOP}" in out

    whole_rows, resumed_rows = log(whole), log(resumed)
    assert [r["step"] for r in resumed_rows] == list(range(1, STEPS + 1))
    for a, b in zip(whole_rows, resumed_rows, strict=True):
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=1e-5), a["step"]
        assert a["lr"] == b["lr"]
    expected, got = saved_weights(whole), saved_weights(resumed)
    assert expected.keys() == got.keys() and any(".patchattn." in k for k in got)
    at_stop = load_file(resumed / "checkpoints" / f"step-{STOP:06d}" / "trainable.safetensors")
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # the resumed steps moved every LoRA B and router: the comparison is not of the checkpoint with itself
    moved = [name for name in expected if not torch.equal(got[name], at_stop[_trainable_name(name)])]
    assert {n for n in expected if "lora_B" in n or n.startswith("patch:")} <= set(moved)


def _trainable_name(saved_name: str) -> str:
    kind, name = saved_name.split(":", 1)
    if kind == "patch":
        return f"base_model.model.{name}"
    return name.replace(".weight", ".default.weight")


def test_resuming_with_another_row_count_warns(tmp_path):
    out = tmp_path / "run"
    one_process(*train_args("moh", out, 2, "--set", "batch=1", "--stop-after", "1"))
    text = one_process(*train_args("moh", out, 2, "--set", "batch=2", "--resume"))
    assert "read 1 rows (1 process(es)); this run's read 2" in text
    assert os.path.exists(out / "adapter" / "adapter_model.safetensors")
