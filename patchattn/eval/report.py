"""``patchattn report out.json --out report/``: a markdown table and PNG plots from ``patchattn eval`` results.

Writes ``README.md`` (the table, the run's command, versions and hardware), ``pareto.png`` (quality versus density,
the Pareto front marked), ``<task>_heatmap.png`` (accuracy per length x depth, one panel per method) and
``blocks.png`` (the key blocks each method read for one layer and head on real text).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import defaultdict

from .blocks import mask_from_json

GEN_TASKS = ("passkey", "needle", "vartrack")


# --------------------------------------------------------------------------------------------------------------
# Numbers out of the results file
# --------------------------------------------------------------------------------------------------------------
def cells_by(results: dict) -> dict:
    """{(method, task): cell}, the latest cell of each pair."""
    return {(c["method"], c["task"]): c for c in results["cells"]}


def methods_in(results: dict) -> list[str]:
    order = list(results.get("methods", {}))
    seen = [c["method"] for c in results["cells"]] + list(results.get("blocks", {}))
    return list(dict.fromkeys(order + seen))


def lengths_of(cell: dict) -> list[int]:
    return sorted({s["length"] for s in cell["samples"]})


def accuracy_by_length(cell: dict) -> dict[int, float]:
    scores = defaultdict(list)
    for s in cell["samples"]:
        scores[s["length"]].append(s["score"])
    return {n: sum(v) / len(v) for n, v in sorted(scores.items())}


def accuracy_grid(cell: dict) -> tuple[list[float], list[int], list[list[float | None]]]:
    """(depths, lengths, mean score [depth][length])."""
    scores = defaultdict(list)
    for s in cell["samples"]:
        scores[(s["depth"], s["length"])].append(s["score"])
    depths = sorted({d for d, _ in scores})
    lengths = sorted({n for _, n in scores})
    grid = [[(sum(scores[(d, n)]) / len(scores[(d, n)])) if scores.get((d, n)) else None for n in lengths]
            for d in depths]
    return depths, lengths, grid


def token_ppl_by_length(cell: dict) -> dict[int, float]:
    nll, tokens = defaultdict(float), defaultdict(int)
    for s in cell["samples"]:
        nll[s["length"]] -= s["loglikelihood"]
        tokens[s["length"]] += s["tokens"]
    return {n: math.exp(nll[n] / tokens[n]) for n in sorted(nll)}


def method_density(results: dict, method: str) -> float | None:
    """Density on real text (the ppl cell) when there is one, else the mean over the method's cells."""
    cells = cells_by(results)
    if (method, "ppl") in cells and cells[(method, "ppl")].get("density") is not None:
        return cells[(method, "ppl")]["density"]
    values = [c["density"] for (m, _), c in cells.items() if m == method and c.get("density") is not None]
    return sum(values) / len(values) if values else None


def summary_rows(results: dict) -> list[dict]:
    """One row per method: density, ppl ratio to dense per length, accuracy per task and length."""
    cells = cells_by(results)
    dense_ppl = token_ppl_by_length(cells[("dense", "ppl")]) if ("dense", "ppl") in cells else {}
    rows = []
    for method in methods_in(results):
        row = {"method": method, "density": method_density(results, method)}
        if (method, "ppl") in cells:
            for n, ppl in token_ppl_by_length(cells[(method, "ppl")]).items():
                row[f"ppl ratio {_k(n)}"] = ppl / dense_ppl[n] if n in dense_ppl else None
        for task in GEN_TASKS:
            if (method, task) in cells:
                for n, acc in accuracy_by_length(cells[(method, task)]).items():
                    row[f"{task} {_k(n)}"] = acc
        rows.append(row)
    return rows


def _k(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the points no other point beats on both density (lower) and quality."""
    def better_or_equal(a, b):
        qa, qb = (a[1], b[1]) if higher_is_better else (-a[1], -b[1])
        return a[0] <= b[0] and qa >= qb and (a[0] < b[0] or qa > qb)

    return [i for i, p in enumerate(points) if not any(better_or_equal(q, p) for q in points)]


# --------------------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------------------
def markdown(results: dict, rows: list[dict], images: list[str]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = [f"# patchattn evaluation: {results.get('model', '?')}", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    lines += ["", ("density: fraction of the causally allowed key blocks read at prefill on the ppl chunks (1 = dense); "
              "ppl ratio: token perplexity / dense's on the same chunks; task columns: accuracy (passkey, needle: "
              "exact match; vartrack: fraction of variables found), over the depths of each length."), ""]
    lines += [f"![{os.path.splitext(i)[0]}]({i})" for i in images]
    params = results.get("params", {})
    env = results.get("environment", {})
    lines += ["", "## How this was made", "", "```", " ".join(results.get("command", [])), "```", "",
              f"Task parameters: `{json.dumps(params)}`", "",
              "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    blocks = results.get("blocks", {})
    if blocks:
        any_map = next(iter(blocks.values()))
        lines += [(f"Block maps: layer {any_map['layer']}, head {any_map['head']}, {any_map['length']} tokens of "
                  "pydoc text."), ""]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return f"`{value}`" if isinstance(value, str) else str(value)


# --------------------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib  # heavy, and only the plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(results: dict, rows: list[dict], path: str) -> bool:
    """Quality versus density: ppl ratio (left) and mean accuracy of each generation task (right)."""
    panels = []
    ppl_cols = sorted((c for r in rows for c in r if c.startswith("ppl ratio")), key=_length_of_column)
    if ppl_cols:
        panels.append((ppl_cols[-1], f"perplexity ratio to dense ({ppl_cols[-1].split()[-1]})", False))
    for task in GEN_TASKS:
        cols = sorted({c for r in rows for c in r if c.startswith(task + " ")}, key=_length_of_column)
        if cols:
            panels.append((cols, f"{task} accuracy (mean over {', '.join(c.split()[-1] for c in cols)})", True))
    if not panels:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (cols, label, higher) in zip(axes[0], panels):
        points, names = [], []
        for r in rows:
            values = [r.get(c) for c in ([cols] if isinstance(cols, str) else cols)]
            if r.get("density") is None or any(v is None for v in values):
                continue
            points.append((r["density"], sum(values) / len(values)))
            names.append(r["method"])
        front = set(pareto_front(points, higher))
        for i, ((x, y), name) in enumerate(zip(points, names)):
            ax.scatter(x, y, s=60, marker="o" if i in front else "x", color="C0" if i in front else "C3")
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ordered = sorted(points[i] for i in front)
        if len(ordered) > 1:
            ax.plot([p[0] for p in ordered], [p[1] for p in ordered], color="C0", linewidth=0.8, linestyle="--")
        ax.set_xlabel("density (fraction of key blocks read)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Quality vs density, {results.get('model', '')} (o: Pareto front, x: dominated)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _length_of_column(column: str) -> int:
    token = column.split()[-1]
    return int(token[:-1]) * 1024 if token.endswith("k") else int(token)


def _panels(plt, n: int, panel_size: tuple[float, float]):
    """A figure of ``n`` panels, three per row; the unused slots of the last row are hidden."""
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(panel_size[0] * cols, panel_size[1] * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, axes


def plot_heatmaps(results: dict, task: str, path: str) -> bool:
    """Accuracy per (depth, length), one panel per method."""
    cells = [c for c in cells_by(results).values() if c["task"] == task and any(
        s.get("depth", -1) >= 0 for s in c["samples"])]
    if not cells:
        return False
    plt = _pyplot()
    fig, axes = _panels(plt, len(cells), (3.6, 3.0))
    for ax, cell in zip(axes.flat, cells):
        depths, lengths, grid = accuracy_grid(cell)
        data = [[float("nan") if v is None else v for v in row] for row in grid]
        ax.imshow(data, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, "-" if v is None else f"{v:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [_k(x) for x in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
        ax.set_title(f"{cell['method']} (acc {cell['metrics'].get('acc', float('nan')):.2f})", fontsize=9)
        ax.set_xlabel("length", fontsize=7)
        ax.set_ylabel("depth", fontsize=7)
    fig.suptitle(f"{task}: accuracy by length and depth ({results.get('model', '')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_blocks(results: dict, path: str) -> bool:
    """The key blocks each method read (white: read) for one layer and head."""
    blocks = results.get("blocks", {})
    if not blocks:
        return False
    plt = _pyplot()
    fig, axes = _panels(plt, len(blocks), (3.3, 3.4))
    for ax, (label, data) in zip(axes.flat, blocks.items()):
        ax.imshow(mask_from_json(data).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        note = " (layer runs dense)" if data["dense"] else ""
        ax.set_title(f"{label}: {data['density']:.2f} of blocks{note}", fontsize=8)
        ax.set_xlabel(f"key block ({data['block_size']} tokens)", fontsize=7)
        ax.set_ylabel("query block", fontsize=7)
        ax.tick_params(labelsize=6)
    first = next(iter(blocks.values()))
    fig.suptitle(f"Key blocks read: layer {first['layer']}, head {first['head']}, {first['length']} tokens of "
                 "real text", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------
def build_report(results: dict, out: str) -> list[str]:
    """Write README.md and the plots into ``out``; returns the files written."""
    os.makedirs(out, exist_ok=True)
    rows = summary_rows(results)
    images = []
    if plot_pareto(results, rows, os.path.join(out, "pareto.png")):
        images.append("pareto.png")
    for task in ("passkey", "needle"):
        if plot_heatmaps(results, task, os.path.join(out, f"{task}_heatmap.png")):
            images.append(f"{task}_heatmap.png")
    if plot_blocks(results, os.path.join(out, "blocks.png")):
        images.append("blocks.png")
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as handle:
        handle.write(markdown(results, rows, images) + "\n")
    return ["README.md", *images]


def read_results(path: str) -> dict:
    """The results file of ``patchattn eval``; errors name the file and how such a file is made."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no results file {path!r}; write one with `patchattn eval --json {path}`")
    try:
        with open(path, encoding="utf-8") as handle:
            results = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a JSON results file of `patchattn eval` ({err})") from None
    if not isinstance(results, dict):  # bad file content, reported like a malformed file
        raise ValueError(f"{path} is not a results file of `patchattn eval` (a JSON object with 'cells')")  # noqa: TRY004
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="patchattn report", description=__doc__)
    p.add_argument("results", help="JSON written by `patchattn eval --json`")
    p.add_argument("--out", default="report", help="folder for README.md and the PNG plots")
    args = p.parse_args(argv)
    results = read_results(args.results)
    if not results.get("cells") and not results.get("blocks"):
        raise ValueError(f"{args.results} holds no results (was it written by `patchattn eval --json`?)")
    written = build_report(results, args.out)
    print(f"wrote {', '.join(os.path.join(args.out, f) for f in written)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
