"""Resuming on another number of processes: checkpoints hold whole tensors (gathered from FSDP2 shards), so a run
stopped after step 2 of 4 with two FSDP2 processes (batch 1 each) and resumed on ONE process with batch 2 (the same
rows per step, ``train/data.first_row``) ends with the adapter and routers of the uninterrupted two-process run, and so does the converse (one process
stops, two FSDP2 processes resume, each loading its shard of the whole tensors).

Equal up to float summation order, not bitwise: one process sums the gradient of both rows in one backward, two
processes average two backwards.  ``aux_weight=0`` here: MoH's load-balance loss is computed over each process's
own rows, so with it the split of a step's rows over processes changes the loss itself (by ~1e-4 on tiny-llama), a
property of data parallelism rather than of the checkpoint."""

import pytest
import torch
from safetensors.torch import load_file

from patchattn.train.run import _warn_if_data_order_changes

from .launch import ACCELERATE, accelerate, log, one_process, saved_weights, train_args

STEPS, STOP = 4, 2
NO_AUX = ("--set", "aux_weight=0", "--set", "save_every=2")


@pytest.mark.skipif(ACCELERATE is None, reason="accelerate's launcher not on PATH")
def test_fsdp2_checkpoints_resume_on_another_process_count(tmp_path):
    whole, two_to_one, one_to_two = tmp_path / "whole", tmp_path / "two_to_one", tmp_path / "one_to_two"
    two, one = ("--set", "batch=1", *NO_AUX), ("--set", "batch=2", *NO_AUX)
    accelerate("fsdp2", 2, "-m", "patchattn.train", *train_args("moh", whole, STEPS, *two))
    # two FSDP2 processes stop; one process resumes (gathered tensors -> plain parameters)
    accelerate("fsdp2", 2, "-m", "patchattn.train", *train_args("moh", two_to_one, STEPS, *two, "--stop-after",
                                                                str(STOP)))
    assert not (two_to_one / "adapter").exists()
    assert load_file(two_to_one / "checkpoints" / f"step-{STOP:06d}" / "optimizer.safetensors")  # AdamW, whole
    out = one_process(*train_args("moh", two_to_one, STEPS, *one, "--resume"))
    assert f"step {STOP}" in out and "warning: the checkpoint" not in out
    # one process stops; two FSDP2 processes resume (whole tensors -> each process's shard)
    one_process(*train_args("moh", one_to_two, STEPS, *one, "--stop-after", str(STOP)))
    out = accelerate("fsdp2", 2, "-m", "patchattn.train", *train_args("moh", one_to_two, STEPS, *two, "--resume"))
    assert f"step {STOP}" in out

    expected = saved_weights(whole)
    assert any(".patchattn." in k for k in expected)
    for resumed in (two_to_one, one_to_two):
        assert [r["step"] for r in log(resumed)] == list(range(1, STEPS + 1))
        for a, b in zip(log(whole), log(resumed), strict=True):
            assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=1e-5), (resumed.name, a["step"])
            assert a["lr"] == b["lr"]
        got = saved_weights(resumed)
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            # A tensor the whole run moved by less than 1e-5 from its zero start (the routers' biases: ~1e-6 after 4
            # steps; their gradient is a cancelling sum near 1e-12, so AdamW's eps-dominated step carries that sum's
            # rounding, which differs with the split of rows over processes) is compared at that level.
            atol = 1e-5 if value.abs().max().item() < 1e-5 else 1e-6
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=atol, msg=f"{resumed.name}: {name}")
        # the resumed steps moved every LoRA B and router: the comparison is not of the checkpoint with itself
        at_stop = load_file(resumed / "checkpoints" / f"step-{STOP:06d}" / "trainable.safetensors")
        moved = {name for name in expected if not torch.equal(got[name], at_stop[_trainable_name(name)])}
        assert {n for n in expected if "lora_B" in n or n.startswith("patch:")} <= moved


def _trainable_name(saved_name: str) -> str:
    kind, name = saved_name.split(":", 1)
    if kind == "patch":
        return f"base_model.model.{name}"
    return name.replace(".weight", ".default.weight")


def test_resuming_with_another_row_count_warns(capsys):
    class Printer:
        print = staticmethod(print)

    layout = {"processes": 1, "parallel": "single", "rows_per_step": 2}
    _warn_if_data_order_changes(Printer, {"processes": 2, "parallel": "fsdp2", "rows_per_step": 2}, layout)
    assert capsys.readouterr().out == ""
    _warn_if_data_order_changes(Printer, {"processes": 2, "parallel": "fsdp2", "rows_per_step": 4}, layout)
    assert "read 4 rows (2 process(es)); this run's read 2 (1)" in capsys.readouterr().out
