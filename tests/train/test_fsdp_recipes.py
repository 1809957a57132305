"""A two-stage recipe under several processes: ``hybrid``'s first stage minimises a loss computed inside the blocks
(the attention-transfer MSE), which never reaches the model's output -- where FSDP2's backward gathers and DDP's
gradient averaging are hooked.  Before the trainer added the LM loss at weight 0 in that stage, FSDP2 failed
("storage of size 0") and DDP failed on the second step, after a first step whose gradient was not averaged
(grad norm of one process's rows).  Both must now train the same."""

import pytest
import torch
from safetensors.torch import load_file

from .launch import ACCELERATE, accelerate, log, train_args

HYBRID = ("--set", "aux_only_steps=1", "--seq-len", "128")


@pytest.mark.skipif(ACCELERATE is None, reason="accelerate's launcher not on PATH")
def test_hybrid_transfer_stage_trains_the_same_under_fsdp2_and_ddp(tmp_path):
    fsdp_out, ddp_out = tmp_path / "fsdp2", tmp_path / "ddp"
    accelerate("fsdp2", 2, "-m", "patchattn.train", *train_args("hybrid", fsdp_out, 2, *HYBRID))
    accelerate("ddp", 2, "-m", "patchattn.train", *train_args("hybrid", ddp_out, 2, *HYBRID))
    fsdp_rows, ddp_rows = log(fsdp_out), log(ddp_out)
    assert [r.get("stage") for r in fsdp_rows] == ["aux_only", None]
    for a, b in zip(fsdp_rows, ddp_rows, strict=True):
        for key in ("loss", "lm_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), (a["step"], key)
    fsdp_state = load_file(fsdp_out / "patch_state.safetensors")
    ddp_state = load_file(ddp_out / "patch_state.safetensors")
    assert fsdp_state and fsdp_state.keys() == ddp_state.keys()
    for name, value in fsdp_state.items():
        torch.testing.assert_close(value, ddp_state[name], rtol=1e-5, atol=1e-7, msg=name)
