"""Markdown table of one `patchattn bench quality` results file (the README's decision-table quality columns).

    python3 bench/quality/table.py bench/quality/smollm2_guide.json
    python3 bench/quality/table.py bench/quality/smollm2_budget25.json

One row per method (its label), the perplexity ratio to the file's dense row for every text and length it holds,
the density read on the first text, and passkey hits per length. Nothing is computed here that the file does not
hold except the ratios.
"""

from __future__ import annotations

import json
import sys


def _ppl_columns(row: dict) -> list[str]:
    return [key.split("@", 1)[1] for key in row if key.startswith("ppl@")]


def _label(column: str) -> str:
    text, _, length = column.rpartition(":")
    return f"{text or 'pydoc'} {int(length) // 1024}k"


def table(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        rows = json.load(handle)["results"]
    dense = next(r for r in rows if r["method"] == "dense")
    columns = _ppl_columns(dense)
    passkeys = sorted(int(key.split("@")[1]) for key in dense if key.startswith("passkey@"))
    header = (["method"] + [f"ppl ratio {_label(c)}" for c in columns] + [f"density {_label(columns[0])}"]
              + [f"passkey {n // 1024}k" for n in passkeys])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"`{row['method']}`"] + [f"{row['ppl@' + c] / dense['ppl@' + c]:.3f}" for c in columns]
        cells.append(f"{row['density@' + columns[0]]:.2f}")
        for n in passkeys:
            cases = row["passkey"][str(n)]
            cells.append(f"{sum(c['correct'] for c in cases)}/{len(cases)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(table(name))
