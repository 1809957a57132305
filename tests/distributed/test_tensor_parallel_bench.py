"""The tensor-parallel benchmark's CPU path: two gloo processes under torchrun, tiny Llama, one row per setting;
the sharded prefill's logits equal the one-process model's (a bench that timed a wrong model would fail here)."""

from __future__ import annotations

import csv
import json
import os
import pathlib
import subprocess
import sys

from .cp_cases import free_port

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "distributed" / "tensor_parallel.py"


def test_bench_runs_on_two_cpu_processes_and_writes_a_stamped_csv(tmp_path):
    out = tmp_path / "tp.csv"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(SCRIPT), "--device", "cpu", "--shape", "tiny", "--tokens", "77", "133",
               "--methods", "dense", "hip", "--layers", "2", "--repeats", "1", "--csv", str(out),
               "--folder", str(tmp_path / "model"),
               "--method-args", json.dumps({"hip": {"block_size": 16, "top_k": 2, "dense_layers": []}})]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    stamp, *lines = out.read_text().splitlines()
    meta = json.loads(stamp.removeprefix("# "))
    assert meta["world"] == 2 and meta["device"] == "cpu" and "commit" in meta and "torch" in meta
    rows = list(csv.DictReader(lines))
    assert {(r["method"], r["tokens"]) for r in rows} == {(m, t) for m in ("dense", "hip") for t in ("77", "133")}
    for row in rows:
        assert row["error"] == "", row
        assert float(row["ms"]) > 0 and float(row["one_gpu_ms"]) > 0 and row["layers"] == "2"
        assert float(row["max_err"]) < 1e-4, row  # TP logits equal the one-process patched model's
