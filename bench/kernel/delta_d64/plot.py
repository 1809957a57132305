"""Plot forward+backward speed against FlexAttention on the same masks before this change set (backward_ab/run2 and
run3, 2026-11-29) and after it (delta_d64/run8 for d128, run5 for d64: delta in the dQ pass, launch order and dK/dV walk by head_dim), and the backward
A/B of order_ab.py (CPU):

    python3 bench/kernel/delta_d64/plot.py
"""
import csv
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BEFORE = {128: "../backward_ab/run2/fwdbwd_d128.csv", 64: "../backward_ab/run3/fwdbwd_d64.csv"}
AFTER = {128: "run8/fwdbwd_d128.csv", 64: "run5/fwdbwd_d64.csv"}


def flex_over_ours(name):
    """{(T, density): Flex time / our time} for the sparse points of one fwd+bwd CSV."""
    with open(os.path.join(HERE, name), encoding="utf-8") as handle:
        rows = list(csv.DictReader(line for line in handle if not line.startswith("#")))
    times = {}
    for r in rows:
        if r["impl"] in ("ours", "flex") and float(r["density_target"]) < 1.0:
            times.setdefault((int(r["T"]), float(r["density_target"])), {})[r["impl"]] = float(r["ms"])
    return {point: t["flex"] / t["ours"] for point, t in sorted(times.items()) if len(t) == 2}


def main(out=os.path.join(HERE, "fwdbwd_vs_flex.png")):
    fig, (ax, ax_ab) = plt.subplots(1, 2, figsize=(14, 4.5))
    series = [(BEFORE[128], "d128 before"), (AFTER[128], "d128 after"), (BEFORE[64], "d64 before"),
              (AFTER[64], "d64 after")]
    points = sorted(set().union(*(flex_over_ours(name).keys() for name, _ in series)))
    width = 0.8 / len(series)
    for i, (name, label) in enumerate(series):
        ratios = flex_over_ours(name)
        xs = [j + (i - 1.5) * width for j, p in enumerate(points) if p in ratios]
        ax.bar(xs, [ratios[p] for p in points if p in ratios], width, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(points)), [f"{t // 1024}k\n{d:.0%}" for t, d in points])
    ax.set_ylabel("fwd+bwd speed vs FlexAttention (>1: ours faster)")
    ax.set_ylim(0.6, 1.2)
    ax.legend(fontsize=8)
    ax.set_title("H200, bf16, 32/8 heads, same random block lists")

    rows = json.load(open(os.path.join(HERE, "run4", "order_ab.json"), encoding="utf-8"))
    impls = ["heads_m64", "tiles_m64", "tiles_m32", "heads_m32"]
    keys = sorted({(r["D"], r["T"], r["density"]) for r in rows}, key=lambda k: (-k[0], k[1], -k[2]))
    flex = {(r["D"], r["T"], r["density"]): r["bwd_ms"] for r in rows if r["impl"] == "flex"}
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        t = {(r["D"], r["T"], r["density"]): r["bwd_ms"] for r in rows if r["impl"] == impl}
        ax_ab.bar([j + (i - 1.5) * width for j in range(len(keys))], [flex[k] / t[k] for k in keys], width,
                  label=impl.replace("_", ", "))
    ax_ab.axhline(1.0, color="black", linewidth=0.8)
    ax_ab.set_xticks(range(len(keys)), [f"d{d}\n{t // 1024}k\n{x:.0%}" for d, t, x in keys], fontsize=7)
    ax_ab.set_ylabel("backward speed vs FlexAttention's backward")
    ax_ab.set_ylim(0.8, 1.1)
    ax_ab.legend(fontsize=8, title="launch order, dK/dV tile", title_fontsize=8)
    ax_ab.set_title("split backward: launch order x dK/dV tile (first config, no autotuning)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print("wrote", out)


if __name__ == "__main__":
    main()
