"""The lm-eval integration end to end on a tiny random model: our model class, lm-eval's own HFLM on a patched
model, the command-line front end, and the errors users meet."""

import json
import os
import subprocess
import sys

import pytest

import patchattn
from patchattn.eval import evaluate
from patchattn.lm_eval.model import PatchAttnLM, parse_method_args
from patchattn.tasks import tasks_path

SPARSE = {"window": 64, "sink_tokens": 16, "block_size": 16}  # streaming that really skips blocks at 256 tokens
PASSKEY = {"lengths": [256], "depths": [0.0, 1.0]}


def _outputs(results, task="patchattn_passkey"):
    return [(s["doc"]["depth"], s["filtered_resps"][0]) for s in results["samples"][task]]


def test_patchattn_model_runs_a_task_end_to_end(tiny_model_dir):
    results = evaluate(tiny_model_dir, "passkey", method="streaming", method_args=SPARSE, log_samples=True,
                       device="cpu", **PASSKEY)
    metrics = results["results"]["patchattn_passkey"]
    assert 0.0 <= metrics["acc,none"] <= 1.0 and "acc_256,none" in metrics
    assert len(results["samples"]["patchattn_passkey"]) == 2
    info = results["patchattn"]
    assert info["method"] == "streaming" and info["config"]["window"] == 64
    assert 0.0 < info["density"] < 1.0, "the streaming window must skip blocks at 256 tokens"
    assert results["config"]["patchattn_method"] == "streaming"


def test_patched_model_object_through_lm_eval_hflm(tiny_model_dir):
    """An already patched model through lm-eval's own HFLM gives exactly what our model class gives."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    ours = evaluate(tiny_model_dir, "passkey", method="streaming", method_args=SPARSE, log_samples=True,
                    device="cpu", **PASSKEY)
    model, tokenizer = patchattn.load(tiny_model_dir)
    patchattn.patch(model, "streaming", **SPARSE)
    manager = TaskManager(include_path=tasks_path(), include_defaults=False,
                          metadata={"tokenizer": tiny_model_dir, **PASSKEY})
    theirs = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer), tasks=["patchattn_passkey"],
                             task_manager=manager, log_samples=True)
    assert _outputs(theirs) == _outputs(ours)
    dense = evaluate(tiny_model_dir, "passkey", method="dense", log_samples=True, device="cpu", **PASSKEY)
    assert _outputs(dense) != _outputs(ours), "reading fewer blocks should change a random model's generations"


def test_front_end_registers_model_and_tasks(tiny_model_dir, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, "-m", "patchattn.lm_eval", "--model", "patchattn",
           "--model_args", f"pretrained={tiny_model_dir},method=streaming,method_args=window:64;block_size:16",
           "--tasks", "patchattn_passkey", "--limit", "1", "--device", "cpu",
           "--metadata", json.dumps(PASSKEY), "--output_path", str(tmp_path / "out")]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "patchattn_passkey" in done.stdout and "acc_256" in done.stdout
    written = [os.path.join(d, f) for d, _, files in os.walk(tmp_path / "out") for f in files if f.endswith(".json")]
    with open(written[0], encoding="utf-8") as handle:
        config = json.load(handle)["config"]
    assert config["patchattn_method"] == "streaming" and config["patchattn_config"]["window"] == 64


def test_method_args_forms():
    assert parse_method_args('{"top_k": 16, "block_size": 32}') == {"top_k": 16, "block_size": 32}
    assert parse_method_args("window:512;sink_tokens:4;backend:torch") == {"window": 512, "sink_tokens": 4,
                                                                           "backend": "torch"}
    assert parse_method_args({"window": 8}) == {"window": 8} and parse_method_args(None) == {}
    with pytest.raises(ValueError, match="JSON object or 'key:value"):
        parse_method_args("window=512")


def test_clear_errors(tiny_model_dir):
    with pytest.raises(ValueError, match="unknown attention method 'hipp'.*Known methods"):
        PatchAttnLM(tiny_model_dir, method="hipp")
    with pytest.raises(ValueError, match="unknown patchattn task 'patchattn_paskey'.*passkey \\(patchattn_passkey\\)"):
        evaluate(tiny_model_dir, "patchattn_paskey", method="dense", device="cpu")


def test_missing_lm_eval_says_what_to_install(monkeypatch):
    from patchattn.lm_eval import require_lm_eval

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what Python does for a package that is not installed
    with pytest.raises(ImportError, match=r"pip install 'patchattn\[eval\]'"):
        require_lm_eval()
