"""Turn the quality sweep (JSON) and the speed run (CSV) into the results table the README shows and a plot of
quality versus speed-up per method.

    python -m patchattn.bench.sparse_report --quality bench/quality/smollm2.json \
        --speed bench/methods/h200.csv --out bench/results
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os


def _read_speed(path: str | None) -> dict:
    """{(mode, T, B, method): row} from the methods benchmark CSV (its first line is a '#' metadata comment)."""
    if not path or not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        lines = [line for line in handle if not line.startswith("#")]
    return {(r["mode"], int(r["T"]), int(r["B"]), r["method"]): r for r in csv.DictReader(lines)}


def _read_peer(label: str, path: str) -> dict:
    """Speed rows, keyed as :func:`_read_speed`'s, from a peer harness's JSON (``bench/methods/hip_attn_peer.py``):
    prefill rows (T, sdpa_ms, hip_attn_ms) and decode rows (mode "decode", T, B, the step eagerly and graphed)."""
    with open(path, encoding="utf-8") as handle:
        rows = json.load(handle)["rows"]
    out = {}
    for r in rows:
        if r.get("mode") == "decode" and r.get("hip_attn_step_ms"):
            row = {"speedup_vs_sdpa": r["sdpa_ms"] / r["hip_attn_step_ms"]}
            if r.get("hip_attn_graph_ms"):
                row["graph_speedup_vs_sdpa"] = r["sdpa_graph_ms"] / r["hip_attn_graph_ms"]
            out[("decode", int(r["T"]), int(r["B"]), label)] = row
        elif r.get("hip_attn_ms"):
            out[("prefill", int(r["T"]), 1, label)] = {"speedup_vs_sdpa": r["sdpa_ms"] / r["hip_attn_ms"]}
    return out


def _f(value, fmt="{:.2f}"):
    return "-" if value in (None, "") else fmt.format(float(value))


def _decode_cell(row: dict) -> str:
    """Speed-up of a whole decode step (selection + kernel) vs SDPA: eager, and replayed from a CUDA graph where the
    run timed that (against SDPA replayed the same way)."""
    if not row:
        return "-"
    eager = _f(row.get("speedup_vs_sdpa"), "{:.1f}x")
    return f"{eager} / {_f(row['graph_speedup_vs_sdpa'], '{:.1f}x')}" if row.get("graph_speedup_vs_sdpa") else eager


def markdown_table(quality: dict, speed: dict, peers: tuple = ()) -> str:
    """The README's table; ``peers``: labels of other projects' rows (speed only: they ran on their own inputs,
    not on our model)."""
    rows = quality["results"] + [{"method": label} for label in peers]
    lengths = sorted({int(k.split("@")[1]) for r in rows for k in r if k.startswith("ratio@")})
    passkeys = sorted({int(k.split("@")[1]) for r in rows for k in r if k.startswith("passkey@")})
    header = ["method"] + [f"ppl ratio {n // 1024}k" for n in lengths] + [f"density {n // 1024}k" for n in lengths]
    header += [f"passkey {n // 1024}k" for n in passkeys]
    header += ["prefill 128k speed-up (kernel / with selection)", "decode 128k B=1 (eager / CUDA graph)",
               "decode 128k B=8 (eager / CUDA graph)", "vs Flex 128k"]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        name = r["method"]
        pre = speed.get(("prefill", 131072, 1, name), {})
        dec1 = speed.get(("decode", 131072, 1, name), {})
        dec8 = speed.get(("decode", 131072, 8, name), {})
        cells = [f"`{name}`"] + [_f(r.get(f"ratio@{n}"), "{:.3f}") for n in lengths]
        cells += [_f(r.get(f"density@{n}")) for n in lengths]
        cells += [_f(r.get(f"passkey@{n}")) for n in passkeys]
        cells += [f"{_f(pre.get('kernel_speedup_vs_sdpa'), '{:.1f}x')} / {_f(pre.get('speedup_vs_sdpa'), '{:.1f}x')}"
                  if pre else "-",
                  _decode_cell(dec1), _decode_cell(dec8),
                  _f(pre.get("vs_flex"), "{:.2f}x")]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(quality: dict, speed: dict, path: str, length: int = 8192) -> None:
    import matplotlib  # heavy, and only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    placed: list[tuple[float, float]] = []
    for r in quality["results"]:
        name = r["method"]
        pre = speed.get(("prefill", 131072, 1, name))
        x = float(pre["speedup_vs_sdpa"]) if pre else 1.0 if name == "dense" else None
        y = r.get(f"ratio@{length}")
        if x is None or y is None:
            continue
        ax.scatter(x, y, s=60)
        # Labels of points that sit on top of each other (variants with one speed row) are stacked, not overprinted.
        near = sum(abs(math.log(x / px)) < 0.15 and abs(y - py) < 0.02 for px, py in placed)
        placed.append((x, y))
        ax.annotate(f"{name} (d={r.get(f'density@{length}', 1):.2f})", (x, y), textcoords="offset points",
                    xytext=(6, 4 - 11 * near), fontsize=8)
    ax.axhline(1.05, color="grey", linestyle="--", linewidth=0.8)
    ax.text(ax.get_xlim()[0], 1.05, " +5% perplexity", va="bottom", fontsize=8, color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("attention prefill speed-up vs SDPA at 128k (H200, incl. block selection)")
    ax.set_ylabel(f"perplexity ratio to dense at {length // 1024}k ({quality['model']})")
    ax.set_title("Training-free sparse attention: quality vs speed")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m patchattn.bench.sparse_report", description=__doc__)
    p.add_argument("--quality", required=True)
    p.add_argument("--speed", action="append", default=[],
                   help="methods-benchmark CSV; repeat it: a later file's rows replace an earlier one's of the same label")
    p.add_argument("--exclude", action="append", default=[],
                   help="MODE:LABEL speed rows to leave out (e.g. a measurement found wrong later)")
    p.add_argument("--peer", action="append", default=[],
                   help="LABEL=JSON: a peer project's speed rows (bench/methods/hip_attn_peer.py output); repeatable")
    p.add_argument("--out", required=True, help="folder for RESULTS.md and quality_vs_speed.png")
    p.add_argument("--alias", action="append", default=[],
                   help="QUALITY_LABEL=SPEED_LABEL when the two runs named the same config differently")
    args = p.parse_args(argv)
    with open(args.quality, encoding="utf-8") as handle:
        quality = json.load(handle)
    speed = {}
    for path in args.speed:
        speed.update(_read_speed(path))
    excluded = {tuple(item.split(":", 1)) for item in args.exclude}
    speed = {key: row for key, row in speed.items() if (key[0], key[3]) not in excluded}
    for alias in args.alias:
        quality_label, speed_label = alias.split("=", 1)
        speed.update({(m, t, b, quality_label): r for (m, t, b, label), r in list(speed.items()) if label == speed_label})
    peers = []
    for item in args.peer:
        label, path = item.split("=", 1)
        speed.update(_read_peer(label, path))
        if label not in peers:
            peers.append(label)
    os.makedirs(args.out, exist_ok=True)
    table = markdown_table(quality, speed, tuple(peers))
    with open(os.path.join(args.out, "RESULTS.md"), "w", encoding="utf-8") as handle:
        handle.write(f"# Sparse methods: quality ({quality['model']}) and speed\n\n{table}\n")
    plot(quality, speed, os.path.join(args.out, "quality_vs_speed.png"))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
