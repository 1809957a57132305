"""`patchattn eval` (methods x tasks, resumable), `patchattn report` (table + plots), `patchattn tasks-path`, and the
block maps they draw, on a tiny random model."""

import json
import os

import torch

import patchattn
from patchattn.cli import main
from patchattn.eval.blocks import read_blocks
from patchattn.eval.report import pareto_front
from patchattn.testing import tiny_model

STREAMING = 'streaming@w64:{"window": 64, "sink_tokens": 16, "block_size": 16}'


def _eval(tiny_model_dir, out, methods, extra=()):
    return main(["eval", "--model", tiny_model_dir, "--methods", methods, "--tasks", "passkey,ppl",
                 "--lengths", "256", "--depths", "0,1", "--json", str(out / "r.json"), "--csv", str(out / "r.csv"),
                 "--blocks-length", "256", *extra])


def test_eval_then_resume_then_report(tiny_model_dir, tmp_path, capsys):
    assert _eval(tiny_model_dir, tmp_path, f"dense;{STREAMING}") == 0
    results = json.loads((tmp_path / "r.json").read_text())
    cells = {(c["method"], c["task"]): c for c in results["cells"]}
    assert set(cells) == {(m, t) for m in ("dense", "streaming@w64") for t in ("passkey", "ppl")}
    assert [(s["length"], s["depth"]) for s in cells[("dense", "passkey")]["samples"]] == [(256, 0.0), (256, 1.0)]
    assert cells[("dense", "ppl")]["density"] == 1.0 and cells[("streaming@w64", "ppl")]["density"] < 1.0
    # Same chunks: a method that reads fewer blocks must change the log-likelihood.
    assert cells[("dense", "ppl")]["metrics"]["token_perplexity"] != \
        cells[("streaming@w64", "ppl")]["metrics"]["token_perplexity"]
    for key in ("torch", "transformers", "lm_eval", "patchattn", "device"):
        assert key in results["environment"]
    assert results["params"]["lengths"] == [256] and "dense" in results["methods"]
    assert results["blocks"]["dense"]["density"] == 1.0 and results["blocks"]["streaming@w64"]["density"] < 1.0
    assert (tmp_path / "r.csv").read_text().startswith("method,task")

    # Resume: nothing runs again; a new method adds only its cells.
    before = (tmp_path / "r.json").read_text()
    capsys.readouterr()
    assert _eval(tiny_model_dir, tmp_path, f"dense;{STREAMING}", ["--no-blocks"]) == 0
    assert "4 cells done, 0 to run" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["cells"] == json.loads(before)["cells"]

    assert main(["report", str(tmp_path / "r.json"), "--out", str(tmp_path / "report")]) == 0
    written = sorted(os.listdir(tmp_path / "report"))
    assert written == ["README.md", "blocks.png", "pareto.png", "passkey_heatmap.png"]
    table = (tmp_path / "report" / "README.md").read_text()
    assert "| `dense` | 1.000 | 1.000 |" in table and "`streaming@w64`" in table


def test_eval_rejects_unknown_names_before_loading(tiny_model_dir, tmp_path, capsys):
    assert _eval(tiny_model_dir, tmp_path, "dense,hipp") == 2
    assert "unknown attention method 'hipp'" in capsys.readouterr().err
    assert main(["eval", "--model", tiny_model_dir, "--tasks", "paskey", "--json", str(tmp_path / "x.json")]) == 2
    assert "unknown patchattn task 'paskey'" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "x.json").exists()


def test_tasks_path_prints_the_task_folder(capsys):
    assert main(["tasks-path"]) == 0
    folder = capsys.readouterr().out.strip()
    assert os.path.exists(os.path.join(folder, "patchattn_passkey.yaml"))


def test_block_map_of_a_static_pattern():
    """streaming's block map on a real forward: sink blocks, then the band of the window, nothing else."""
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 128))
    block_map = read_blocks(model, ids, "streaming", {"window": 32, "sink_tokens": 16, "block_size": 16}, layer=1)
    mask = block_map.mask
    assert mask.shape == (8, 8) and not block_map.dense
    for q in range(8):
        read = set(torch.nonzero(mask[q]).flatten().tolist())
        assert 0 in read and q in read, "the sink block and the query's own block are always read"
        assert read <= {0} | set(range(max(0, q - 3), q + 1)), f"query block {q} read outside its window: {read}"
    assert 0 < block_map.density < 1
    dense = read_blocks(model, ids, "dense", layer=1)
    assert dense.dense and dense.density == 1.0
    assert patchattn.get_handle(model) is None


def test_pareto_front():
    points = [(1.0, 1.0), (0.5, 1.05), (0.3, 1.2), (0.6, 1.3)]  # (density, ppl ratio): lower is better
    assert pareto_front(points, higher_is_better=False) == [0, 1, 2]
    assert pareto_front([(1.0, 1.0), (0.5, 0.5), (0.5, 0.8)], higher_is_better=True) == [0, 2]
