"""Plot the 2026-11-29 list-walk A/Bs (CPU): forward vs FlexAttention with three loops / one loop per list, and the
backward's time with each walk.

    python3 bench/kernel/one_loop/plot.py
"""
import csv
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _fwd_rows(name):
    with open(os.path.join(HERE, name), encoding="utf-8") as handle:
        rows = list(csv.DictReader(line for line in handle if not line.startswith("#")))
    times = {}
    for r in rows:
        if r["impl"] in ("ours", "flex") and float(r["density_target"]) < 1.0:
            times.setdefault((int(r["T"]), float(r["density_target"])), {})[r["impl"]] = float(r["ms"])
    return {point: t["flex"] / t["ours"] for point, t in sorted(times.items())}


def main(out=os.path.join(HERE, "one_loop.png")):
    fig, (ax_fwd, ax_bwd) = plt.subplots(1, 2, figsize=(13, 4.5))
    series = [("fwd_loops3.csv", "d128, three loops"), ("fwd_loops1.csv", "d128, one loop"),
              ("fwd_d64.csv", "d64, one loop")]
    points = sorted(set().union(*(_fwd_rows(name).keys() for name, _ in series)))
    width = 0.8 / len(series)
    for i, (name, label) in enumerate(series):
        ratios = _fwd_rows(name)
        xs = [j + (i - 1) * width for j, p in enumerate(points) if p in ratios]
        ax_fwd.bar(xs, [ratios[p] for p in points if p in ratios], width, label=label)
    ax_fwd.axhline(1.0, color="black", linewidth=0.8)
    ax_fwd.set_xticks(range(len(points)), [f"{t // 1024}k\n{d:.0%}" for t, d in points])
    ax_fwd.set_ylabel("forward speed vs FlexAttention (same mask; >1: ours faster)")
    ax_fwd.set_title("Forward, H200, 32/8 heads, block 128")
    ax_fwd.legend(fontsize=8)

    with open(os.path.join(HERE, "bwd_ab.json"), encoding="utf-8") as handle:
        bwd = json.load(handle)
    pts = sorted({(r["T"], r["density"]) for r in bwd})
    by = {(r["T"], r["density"], r["one_loop"]): r["bwd_ms"] for r in bwd}
    ax_bwd.bar(range(len(pts)), [by[(t, d, False)] / by[(t, d, True)] for t, d in pts], 0.6, color="tab:green")
    ax_bwd.axhline(1.0, color="black", linewidth=0.8)
    ax_bwd.set_ylim(0.9, 1.2)
    ax_bwd.set_xticks(range(len(pts)), [f"{t // 1024}k\n{d:.0%}" for t, d in pts])
    ax_bwd.set_ylabel("backward speed-up, one loop over a loop per stretch")
    ax_bwd.set_title("Backward (split mode, d128, fixed config)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
