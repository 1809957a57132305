# python3 bench/kernel/group_walk/plot.py  ->  bench/kernel/group_walk/group_walk.png
"""The dK/dV group-walk A/B (run1/group_ab.json): split backward time with one walk over (entry, head) pairs ("flat")
over one walk per head ("loop"), per point, both head dims; below 1 the flat walk is faster."""
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
rows = json.load(open(os.path.join(HERE, "run1", "group_ab.json")))
times = {(r["D"], r["T"], r["density"], r["group_walk"]): r["bwd_ms"] for r in rows}
points = sorted({(r["T"], r["density"]) for r in rows}, key=lambda p: (p[0], -p[1]))
fig, ax = plt.subplots(figsize=(8, 3.6))
width = 0.38
for i, (D, color) in enumerate(((64, "tab:blue"), (128, "tab:orange"))):
    ratios = [times[(D, T, d, "flat")] / times[(D, T, d, "loop")] for T, d in points]
    xs = [j + (i - 0.5) * width for j in range(len(points))]
    ax.bar(xs, ratios, width, color=color, label=f"head_dim {D}")
ax.axhline(1.0, color="black", linewidth=0.8)
ax.set_xticks(range(len(points)), [f"{T // 1024}k\n{d:.0%}" for T, d in points])
ax.set_ylim(0.9, 1.08)
ax.set_ylabel("backward time, flat / loop")
ax.set_title("dK/dV pass, GQA group of 4 sharing a list: flat walk vs a walk per head (H200, bf16)", fontsize=10)
ax.legend(loc="upper right")
fig.tight_layout()
fig.savefig(os.path.join(HERE, "group_walk.png"), dpi=120)
