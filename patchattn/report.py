"""Small helpers shared by the CLI, demo, eval and benchmarks: plain-text tables and run metadata."""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch
import transformers

from . import __version__


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A plain-text table (readable in CI logs and terminals alike)."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join([line, rule, *body])


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """The same table as markdown."""
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def environment() -> dict:
    """Versions and hardware, recorded next to every result."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    try:
        import triton  # optional: absent on CPU-only installs

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["patchattn"] = __version__
    info["commit"] = source_commit()
    info["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return info


def source_commit() -> str | None:
    """The git commit of the patchattn source that ran (``+dirty`` with uncommitted changes to tracked files),
    or None outside a git checkout (an installed wheel, a copy without ``.git``); ``PATCHATTN_COMMIT``, when set,
    names it instead (a copy sent to another machine with stale git metadata)."""
    stated = os.environ.get("PATCHATTN_COMMIT")  # a copy whose git metadata is stale (a remote GPU machine's)
    if stated:
        return stated
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def write_stamped_csv(path: str, rows: list[dict], fields, command: str) -> None:
    """``rows`` to the CSV ``path`` (columns ``fields``, extra keys ignored) and, beside it, ``<path>.json`` with the
    command and ``environment()``: one results file per figure, stamped."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with open(path.rsplit(".", 1)[0] + ".json", "w", encoding="utf-8") as handle:
        json.dump({"command": command, **environment()}, handle, indent=2)
