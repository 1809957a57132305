"""Offline lm-eval tasks: passkey, multi-key needle, variable tracking, rolling perplexity on pydoc text.

The YAML files in this folder are lm-eval tasks whose data is generated on the fly, deterministically from a seed
(``generators.py``), so nothing is downloaded.  ``python -m patchattn.lm_eval`` finds them by itself; with the stock
``lm_eval`` command pass ``--include_path "$(patchattn tasks-path)"``.
"""

from __future__ import annotations

import argparse
import os

TASKS_DIR = os.path.dirname(os.path.abspath(__file__))

# Short names (`patchattn eval --tasks passkey,ppl`) -> lm-eval task names.
TASKS = {
    "passkey": "patchattn_passkey",
    "needle": "patchattn_needle",
    "vartrack": "patchattn_vartrack",
    "ppl": "patchattn_ppl",
}


def tasks_path() -> str:
    """The folder to hand lm-eval as ``--include_path``."""
    return TASKS_DIR


def task_name(name: str) -> str:
    """The lm-eval task name of a short or full task name; ValueError listing the known ones otherwise."""
    if name in TASKS:
        return TASKS[name]
    if name in TASKS.values():
        return name
    known = ", ".join(f"{k} ({v})" for k, v in TASKS.items())
    raise ValueError(f"unknown patchattn task {name!r}; known tasks: {known}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="patchattn tasks-path",
        description="Print the folder of patchattn's offline lm-eval tasks, for lm_eval --include_path.",
    )
    parser.add_argument("--list", action="store_true", help="also list the task names")
    args = parser.parse_args(argv)
    print(tasks_path())
    if args.list:
        for short, full in TASKS.items():
            print(f"{full}  ({short})")
    return 0
