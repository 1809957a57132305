"""The plot of ``patchattn bench generate``: per batch size, time-to-first-token speed-up vs SDPA and decode
tokens/s against the prompt length, one line per method (colour) and cache kind (line style). Redraws from
committed CSVs without a GPU:

    python -m patchattn.bench.generate_plot bench/generate/*.csv --out bench/generate/generate.png

Several CSVs are merged; a configuration measured twice (method, cache, batch, prompt) keeps its last row. Error
rows are not drawn.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

STYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1)))
MARKERS = ("o", "s", "^", "D", "v")


def read_rows(paths: list[str]) -> list[dict]:
    """The rows of ``patchattn bench generate`` CSVs (their first line, the environment, skipped)."""
    rows = []
    for path in paths:
        with open(path, newline="", encoding="utf-8") as handle:
            lines = [line for line in handle if not line.startswith("#")]
        rows += list(csv.DictReader(lines))
    return rows


def _latest(rows: list[dict]) -> list[dict]:
    latest = {(r["method"], r["cache"], int(r["batch"]), int(r["prompt"])): r for r in rows}
    return list(latest.values())


def _ticks(prompt: int) -> str:
    return f"{prompt // 1024}k" if prompt >= 1024 and prompt % 1024 == 0 else str(prompt)


def plot(rows: list[dict], out: str) -> str:
    """Draw ``rows`` (dicts as written to, or read from, the CSV) into the PNG ``out``; returns ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .generate import _number, add_sdpa_ratios

    rows = add_sdpa_ratios([dict(r) for r in _latest(rows)])
    good = [r for r in rows if not r.get("error") and _number(r.get("ttft_s")) is not None]
    batches = sorted({int(r["batch"]) for r in good}) or [1]
    methods = list(dict.fromkeys(r["method"] for r in good))
    caches = list(dict.fromkeys(r["cache"] for r in good))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(len(batches), 2, figsize=(12, 4.2 * len(batches)), squeeze=False)
    for (left, right), batch in zip(axes, batches):
        for i, method in enumerate(methods):
            for j, cache in enumerate(caches):
                line = sorted((int(r["prompt"]), r) for r in good
                              if r["method"] == method and r["cache"] == cache and int(r["batch"]) == batch)
                if not line:
                    continue
                style = dict(color=colours[i % len(colours)], linestyle=STYLES[j % len(STYLES)],
                             marker=MARKERS[j % len(MARKERS)], label=f"{method} / {cache}")
                prompts = [p for p, _ in line]
                left.plot(prompts, [_number(r["ttft_vs_sdpa"]) for _, r in line], **style)
                right.plot(prompts, [_number(r["decode_tok_s"]) for _, r in line], **style)
        for ax, title, ylabel in ((left, "time to first token: speed-up vs SDPA", "x SDPA"),
                                  (right, "decode throughput", "tokens / s")):
            prompts = sorted({int(r["prompt"]) for r in good if int(r["batch"]) == batch})
            ax.set_xscale("log", base=2)
            ax.set_xticks(prompts or [1], [_ticks(p) for p in prompts] or ["-"])
            ax.minorticks_off()
            ax.set_title(f"{title}, batch {batch}")
            ax.set_xlabel("prompt tokens")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        left.axhline(1.0, color="grey", linewidth=0.8)
    handles, labels = axes[0][1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m patchattn.bench.generate_plot", description=__doc__.splitlines()[0])
    p.add_argument("csv", nargs="+", help="CSVs written by patchattn bench generate")
    p.add_argument("--out", required=True, help="the PNG to write")
    args = p.parse_args(argv)
    print(plot(read_rows(args.csv), args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
