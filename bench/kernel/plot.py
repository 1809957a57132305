"""Plot bench/kernel results (CPU, from the CSVs): time relative to dense SDPA vs density."""
import csv
import os
import sys
from collections import defaultdict

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def load(paths):
    rows = []
    for path in paths:
        with open(path) as f:
            rows += list(csv.DictReader(line for line in f if not line.startswith("#")))
    # later files win for the same point (the D=128 run supersedes run 2's D=128 rows)
    best = {}
    for r in rows:
        best[(r["mode"], r["T"], r["D"], r["B"], r["density_target"], r["impl"])] = r
    return list(best.values())


def main(out=os.path.join(HERE, "kernel_speed.png")):
    rows = load([os.path.join(HERE, f) for f in
                 ("results_run2.csv", "results_d128.csv", "results_d64_bwd.csv")])
    sdpa = {(r["mode"], r["T"], r["D"], r["B"]): float(r["ms"]) for r in rows if r["impl"] == "sdpa"}
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    colors = dict(zip(["4096", "16384", "65536", "131072"], ["C0", "C1", "C2", "C3"]))
    for ax, (mode, D) in zip(axes.flat, [("fwd", "64"), ("fwd", "128"), ("fwdbwd", "64"),
                                         ("fwdbwd", "128")]):
        series = defaultdict(list)
        for r in rows:
            if r["mode"] != mode or r["D"] != D or r["impl"] not in ("ours", "flex"):
                continue
            dens = float(r["density"])
            if dens >= 0.999 or dens <= 0:
                continue
            base = sdpa.get((mode, r["T"], D, r["B"]))
            if base:
                series[(r["impl"], r["T"])].append((dens, float(r["ms"]) / base))
        for (impl, T), pts in sorted(series.items()):
            pts.sort()
            ax.plot(*zip(*pts), marker="o" if impl == "ours" else "x",
                    linestyle="-" if impl == "ours" else "--", color=colors.get(T, "k"),
                    label=f"{impl} T={int(T) // 1024}k")
        xs = [0.02, 0.5]
        ax.plot(xs, xs, color="gray", lw=0.8, label="d x SDPA (ideal)")
        ax.plot(xs, [1.3 * x for x in xs], color="gray", lw=0.8, ls=":", label="1.3 d x SDPA")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([0.02, 0.05, 0.1, 0.2, 0.5])
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("density (fraction of causal key blocks read)")
        ax.set_ylabel("time / dense SDPA time")
        ax.set_title(f"{mode}, head_dim {D}, 32 q / 8 kv heads, bf16, H200")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
