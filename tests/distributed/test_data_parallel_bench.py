"""bench/distributed/data_parallel.py: tokens/s from a run's own log and metrics (a real tiny run; a second folder
that claims 2 processes and twice the tokens per step in the same time must come out at 2x)."""

from __future__ import annotations

import csv
import json
import pathlib
import shutil
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "distributed"))
import data_parallel


def test_throughput_of_a_real_run_and_a_doubled_one(tmp_path):
    from patchattn.train import RunOptions, load_recipe, train_model

    recipe = load_recipe("moh", {"model": "tiny-llama", "steps": 8, "seq_len": 32, "eval_every": 0, "save_every": 0,
                                 "output_dir": str(tmp_path / "one")})
    train_model(recipe, RunOptions(progress=False, evaluate=False))
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    metrics.update(processes=2, parallel="ddp", tokens_per_step=2 * metrics["tokens_per_step"])
    (tmp_path / "two" / "metrics.json").write_text(json.dumps(metrics))
    out = tmp_path / "dp.csv"
    assert data_parallel.main([str(tmp_path / "one"), str(tmp_path / "two"), "--skip", "2", "--csv", str(out)]) == 0
    stamp, *lines = out.read_text().splitlines()
    assert "commit" in json.loads(stamp.removeprefix("# "))
    one, two = csv.DictReader(lines)
    assert int(one["steps_timed"]) == 5 and int(one["tokens_per_step"]) == 32
    assert float(one["tokens_per_s"]) == pytest.approx(32 * 5 / float(one["seconds"]))
    assert float(two["speedup"]) == pytest.approx(2.0)
    with pytest.raises(SystemExit, match="need more than"):
        data_parallel.main([str(tmp_path / "one"), "--skip", "8"])
