"""examples/context_parallel.py under torchrun: two CPU processes (gloo) on a saved tiny Llama with SmolLM2's
tokenizer; the prefill equals the one-process prefill and rank 0 decodes from the gathered cache."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

from .cp_cases import free_port

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_example_runs_under_torchrun(tmp_path):
    from patchattn.testing import tiny_model

    try:
        from patchattn.tasks.generators import load_tokenizer

        tokenizer = load_tokenizer("smollm2")
    except ImportError as err:
        pytest.skip(f"needs the embedded SmolLM2 tokenizer: {err}")
    model = tiny_model("llama")
    model.resize_token_embeddings(len(tokenizer))  # the tokenizer's ids are valid
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(ROOT / "examples" / "context_parallel.py"), "blocktopk", "200", str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0: prefilled" in done.stdout and "rank 1: prefilled" in done.stdout
    error = float(re.search(r"one process\| logits: (\S+)", done.stdout).group(1))
    assert error < 1e-4
    assert "continuation:" in done.stdout
