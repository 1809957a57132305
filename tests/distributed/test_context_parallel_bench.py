"""The context-parallel benchmark's CPU path: two gloo processes under torchrun, tiny Llama, one row per setting."""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import subprocess
import sys

from .cp_cases import free_port

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "distributed" / "context_parallel.py"


def test_bench_runs_on_two_cpu_processes_and_writes_a_stamped_csv(tmp_path):
    out = tmp_path / "cp.csv"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(SCRIPT), "--device", "cpu", "--shape", "tiny", "--tokens", "133",
               "--methods", "hip", "dense", "--layers", "1", "--repeats", "1", "--csv", str(out),
               "--method-args", json.dumps({"hip": {"block_size": 16, "top_k": 2}})]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    stamp, *lines = out.read_text().splitlines()
    meta = json.loads(stamp.removeprefix("# "))
    assert meta["world"] == 2 and meta["device"] == "cpu" and "commit" in meta and "torch" in meta
    rows = list(csv.DictReader(lines))
    assert {(r["mode"], r["method"], r["exchange"]) for r in rows} == {
        (m, method, e) for m in ("attention", "model") for method in ("hip", "dense")
        for e in ("allgather", "ring", "ring_attention") if e != "ring_attention" or method == "dense"}
    for row in rows:
        assert row["error"] == "", row
        assert float(row["ms"]) > 0 and float(row["one_gpu_ms"]) > 0
        if row["mode"] == "attention":  # each rank's rows equal the one-process call's
            assert float(row["max_err"]) < 1e-5, row
        else:
            assert math.isnan(float(row["max_err"]))
