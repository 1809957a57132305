"""Data-parallel training (torch.distributed, gloo on CPU): each process reads its own rows, the logged loss is the
mean over processes, the main process alone writes the run's files -- and two processes with batch 1 train exactly
as one process with batch 2 (DDP averages the gradients of equal halves)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from patchattn.train.data import first_row
from patchattn.train.recipe import TrainConfig


def test_processes_read_disjoint_rows_in_the_order_of_one_bigger_batch():
    config = TrainConfig(batch=2, grad_accum=3)
    one = TrainConfig(batch=4, grad_accum=3)
    for step in range(3):
        for micro in range(3):
            rows = [first_row(config, step, micro, rank, 2) + i for rank in range(2) for i in range(2)]
            assert len(set(rows)) == 4
    # grad_accum 1: rank r's rows are the r-th half of the one-process batch
    config, one = TrainConfig(batch=2, grad_accum=1), TrainConfig(batch=4, grad_accum=1)
    for step in range(4):
        halves = [list(range(first_row(config, step, 0, r, 2), first_row(config, step, 0, r, 2) + 2)) for r in (0, 1)]
        assert halves[0] + halves[1] == list(range(first_row(one, step, 0), first_row(one, step, 0) + 4))


def _log(path):
    with open(os.path.join(path, "log.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def _train(tmp_path, name, launcher, batch):
    out = tmp_path / name
    cmd = [*launcher, "-m", "patchattn.train", "moh", "--model", "tiny-llama", "--steps", "2", "--seq-len", "64",
           "--no-eval", "--no-progress", "--output", str(out), "--set", f"batch={batch}", "--set", "warmup=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_processes_train_as_one_with_twice_the_batch(tmp_path):
    torchrun = [shutil.which("torchrun"), "--nproc_per_node", "2", "--master_port", "29533"]
    parallel, stdout = _train(tmp_path, "ddp", torchrun, 1)
    single, _ = _train(tmp_path, "one", [sys.executable], 2)
    ddp_rows, one_rows = _log(parallel), _log(single)
    assert [r["step"] for r in ddp_rows] == [1, 2]  # one writer
    for a, b in zip(ddp_rows, one_rows):
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=1e-4, abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3, abs=1e-6)
    assert stdout.count("outputs in") == 1
    assert (parallel / "adapter" / "adapter_model.safetensors").exists()
