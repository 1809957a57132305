"""``patchattn bench dit`` on the CPU with tiny shapes: every row written, the environment stamped, bad names
refused before any timing."""

import csv
import json

import pytest

pytest.importorskip("diffusers")

from patchattn.bench import dit


def test_bench_dit_writes_rows_and_environment(tmp_path):
    out = tmp_path / "dit.csv"
    assert dit.main(["--shapes", "tiny", "--methods", "dense", "--device", "cpu", "--dtype", "float32",
                     "--layers", "1", "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [(r["shape"], r["mode"], r["method"]) for r in rows] == [
        ("tiny-flux", "attention", "dense"), ("tiny-flux", "forward", "dense"),
        ("tiny-wan", "attention", "dense"), ("tiny-wan", "forward", "dense")]
    assert all(float(r["ms"]) > 0 and float(r["sdpa_ms"]) > 0 for r in rows)
    meta = json.loads((tmp_path / "dit.json").read_text())
    assert meta["command"].startswith("python -m patchattn.bench.dit") and "torch" in meta and "commit" in meta


def test_bench_dit_refuses_unknown_names():
    with pytest.raises(ValueError, match="Known methods"):
        dit.main(["--shapes", "tiny", "--methods", "no_such_method", "--device", "cpu"])
    with pytest.raises(SystemExit, match="unknown shapes"):
        dit.main(["--shapes", "flux-8k", "--methods", "dense", "--device", "cpu"])
