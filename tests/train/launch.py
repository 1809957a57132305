"""Helpers of the multi-process training tests: ``accelerate launch`` with the shipped configs on a free port."""

import json
import os
import shutil
import socket
import subprocess
import sys

from safetensors.torch import load_file

from patchattn.train.recipe import SHIPPED

CONFIGS = SHIPPED / "accelerate"
ACCELERATE = shutil.which("accelerate")
TINY = ["--model", "tiny-llama", "--seq-len", "64", "--no-eval", "--no-progress", "--set", "warmup=1"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(cmd: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout + done.stderr


def accelerate(config: str, processes: int, *args: str) -> str:
    """``accelerate launch --config_file patchattn/recipes/accelerate/<config>.yaml`` of a module or a script."""
    return run([ACCELERATE, "launch", "--config_file", str(CONFIGS / f"{config}.yaml"), "--num_processes",
                str(processes), "--main_process_port", str(free_port()), *args])


def train_args(recipe: str, output, steps: int, *extra: str) -> list[str]:
    return [recipe, "--steps", str(steps), "--output", str(output), *TINY, *extra]


def one_process(*args: str) -> str:
    return run([sys.executable, "-m", "patchattn.train", *args])


def log(output) -> list[dict]:
    with open(os.path.join(output, "log.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def saved_weights(output) -> dict:
    """The run's LoRA adapter and patch state, by name."""
    weights = {f"lora:{k}": v for k, v in load_file(os.path.join(output, "adapter", "adapter_model.safetensors")).items()}
    weights.update({f"patch:{k}": v for k, v in load_file(os.path.join(output, "patch_state.safetensors")).items()})
    return weights
