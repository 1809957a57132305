"""Plot bench/decode/methods_decode_l{1,8}.csv (CPU): decode-step speed-up vs SDPA per method, eager and from a CUDA
graph holding 1 or 8 layers (each layer its own cache).

    python3 bench/decode/plot.py
"""
import csv
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _rows(layers):
    with open(os.path.join(HERE, f"methods_decode_l{layers}.csv"), encoding="utf-8") as handle:
        return list(csv.DictReader(line for line in handle if not line.startswith("#")))


def main(out=os.path.join(HERE, "decode_speedup.png")):
    runs = {1: _rows(1), 8: _rows(8)}
    methods = list(dict.fromkeys(r["method"] for r in runs[1]))
    series = [(1, "speedup_vs_sdpa", "eager"), (1, "graph_speedup_vs_sdpa", "graph, 1 layer"),
              (8, "graph_speedup_vs_sdpa", "graph, 8 layers")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    width = 0.8 / len(series)
    for ax, batch in zip(axes, ("1", "8")):
        for i, (layers, kind, label) in enumerate(series):
            values = [next(float(r[kind]) for r in runs[layers] if r["method"] == m and r["B"] == batch)
                      for m in methods]
            ax.bar([j + (i - 1) * width for j in range(len(methods))], values, width, label=label)
        ax.axhline(4.0, color="grey", linestyle="--", linewidth=0.8)
        ax.axhline(1.0, color="black", linewidth=0.6)
        ax.text(-0.5, 4.0, " issue target 4x", ha="left", va="bottom", fontsize=8, color="grey")
        ax.set_yscale("log")
        ax.set_xticks(range(len(methods)), methods, rotation=20)
        ax.set_title(f"batch {batch}")
    axes[0].set_ylabel("decode step speed-up vs SDPA (selection + kernel)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Decode at 128k keys, Llama-3-8B attention shapes, NVIDIA H200")
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    print(out)


if __name__ == "__main__":
    main()
