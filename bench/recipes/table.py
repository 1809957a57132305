"""Print the markdown results table from bench/recipes/<recipe>/metrics.json (python bench/recipes/table.py)."""

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
COLUMNS = ("recipe", "steps x tokens", "ppl dense", "ppl before", "ppl after", "train-attn ppl before",
           "train-attn ppl after", "decode ppl dense / before / after", "wall time")


def row(m: dict) -> list[str]:
    decode = "-"
    if "decode_ppl_dense" in m:
        decode = f"{m['decode_ppl_dense']:.2f} / {m['decode_ppl_before']:.2f} / {m['decode_ppl_after']:.2f}"
    return [f"`{m['recipe']}`", f"{m['steps']} x {m['tokens_per_step']}", f"{m['ppl_dense']:.2f}",
            f"{m['ppl_before']:.2f}", f"{m['ppl_after']:.2f}", f"{m['ppl_training_attention_before']:.2f}",
            f"{m['ppl_training_attention_after']:.2f}", decode, f"{m['wall_time_s'] / 60:.0f} min"]


def main() -> None:
    rows = []
    for name in sorted(os.listdir(HERE)):
        path = os.path.join(HERE, name, "metrics.json")
        if os.path.exists(path):
            with open(path) as handle:
                rows.append(row(json.load(handle)))
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
