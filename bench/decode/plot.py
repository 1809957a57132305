"""Plot bench/decode/methods_decode.csv (CPU): decode-step speed-up vs SDPA per method, eager and CUDA-graphed.

    python3 bench/decode/plot.py
"""
import csv
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main(path=os.path.join(HERE, "methods_decode.csv"), out=os.path.join(HERE, "decode_speedup.png")):
    with open(path, encoding="utf-8") as handle:
        rows = list(csv.DictReader(line for line in handle if not line.startswith("#")))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    series = [(b, kind) for b in ("1", "8") for kind in ("speedup_vs_sdpa", "graph_speedup_vs_sdpa")]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(series)
    for i, (batch, kind) in enumerate(series):
        values = [next(float(r[kind]) for r in rows if r["method"] == m and r["B"] == batch) for m in methods]
        label = f"B={batch}, {'CUDA graph' if kind.startswith('graph') else 'eager'}"
        ax.bar([j + (i - 1.5) * width for j in range(len(methods))], values, width, label=label)
    ax.axhline(4.0, color="grey", linestyle="--", linewidth=0.8)
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax.text(len(methods) - 0.5, 4.0, "issue target 4x ", ha="right", va="bottom", fontsize=8, color="grey")
    ax.set_yscale("log")
    ax.set_xticks(range(len(methods)), methods, rotation=15)
    ax.set_ylabel("decode step speed-up vs SDPA (selection + kernel)")
    ax.set_title("Decode at 128k keys, Llama-3-8B attention shapes, NVIDIA H200")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    print(out)


if __name__ == "__main__":
    main()
