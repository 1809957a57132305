"""The Gemma-3-270M table at 8k (CPU) from the three sweeps ``run_gemma_all_cpu.sh`` and ``run_gemma_cpu.sh`` made:

    python3 bench/quality/gemma_table.py > bench/quality/gemma3-270m_table.md

Perplexity ratios come from the file that measured each method (same tokens: dense is 10.0313 in both), passkeys
from ``gemma3-270m_new.json`` / ``gemma3-270m_passkey.json``. Densities: the sweeps ran before windowed layers
reported their window's share (they recorded 1.0), so the mean over Gemma-3-270M's 18 layers, 15 windowed and 3
full, is converted exactly: the full layers' density is ``(18 * mean - 15) / 3``, and the whole model's, with each
windowed layer at what its 512-key window reads at 8k, is ``(15 * w + 3 * full) / 18``."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from patchattn.methods._sparse import window_density  # noqa: E402

HERE = Path(__file__).parent
LAYERS, WINDOWED, WINDOW, T = 18, 15, 512, 8192


def rows(name):
    return {r["method"]: r for r in json.loads((HERE / name).read_text())["results"]}


def main():
    first, new, passkey = rows("gemma3-270m.json"), rows("gemma3-270m_new.json"), rows("gemma3-270m_passkey.json")
    dense_ppl = new["dense"]["ppl@8192"]
    assert abs(first["dense"]["ppl@8192"] - dense_ppl) < 1e-9, "the sweeps must share tokens and environment"
    w = window_density(T, T, WINDOW)
    print(f"| method | ppl ratio 8k | density of the 3 full layers | whole-model density (windows at {w:.3f}) "
          "| passkey 8k |")
    print("|---|---|---|---|---|")
    order = ["dense", "streaming", "power", "s2", "moa", "hyper", "duo", "hip", "blocktopk", "blocktopk@top14"]
    for label in order:
        ppl_row = new.get(label) or first.get(label)
        if ppl_row is None:
            continue
        full = (LAYERS * ppl_row["density@8192"] - WINDOWED) / (LAYERS - WINDOWED)
        model = (WINDOWED * w + (LAYERS - WINDOWED) * full) / LAYERS
        key_row = new.get(label) if label in new else passkey.get(label, {})
        score = key_row.get("passkey@8192")
        score = "-" if score is None else f"{score:.2f}"
        print(f"| `{label}` | {ppl_row['ppl@8192'] / dense_ppl:.3f} | {full:.2f} | {model:.2f} | {score} |")


if __name__ == "__main__":
    main()
