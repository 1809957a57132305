"""CPU micro-benchmark of design note 58: peak memory and time of landmark's inference retrieval and dma's key
ranking, for whichever ``patchattn`` is imported (run it once on the tree before note 58, once after).

    python3 bench/linear/scale_cpu.py --label after --csv bench/linear/scale_cpu_new.csv
    mkdir -p /tmp/before && git archive a9b9ed2 | tar -x -C /tmp/before && \\
        PYTHONPATH=/tmp/before python3 bench/linear/scale_cpu.py --label before --csv bench/linear/scale_cpu_old.csv

Each case runs in a fresh process (``--one``): inputs made, then one timed call under ``torch.no_grad()``; peak =
the process's peak resident memory minus its resident memory just before the call (glibc gives large blocks back
to the system, so the peak is the call's own high-water mark).  Cases (fp32, batch 1, head_dim 128):

- ``landmark``: ``grouped_landmark_attention`` (torch backend: local call, retrieval, one engine call per list
  entry, mix), top_k 5, block 64, random q/k/v (so a query block's rows retrieve mostly different blocks);
- ``dma_rank``: ``kept_until`` (window 2048, recency 1) on a random bias (``A`` trained-like: not a sliding window);
- ``dma_lists``: ``kept_until`` + ``dynamic_mask_lists`` (the block lists and partial tiles the engine reads).
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import time
import types

import torch

CASES = [  # (case, T, q heads, kv heads)
    ("landmark", 4096, 32, 8), ("landmark", 16384, 4, 1),
    ("dma_rank", 16384, 32, 8), ("dma_lists", 16384, 32, 8),
]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _landmark(T, hq, hkv):
    from patchattn.methods import landmark

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, T, 128, generator=gen) for h in (hq, hkv, hkv))
    config = landmark.LandmarkConfig(block_size=64, top_k=5, backend="torch")
    state = types.SimpleNamespace(config=config, landmark_query=torch.zeros(hkv, 128),
                                  landmark_offset=torch.full((hkv,), 4.16), record=lambda **_: None)
    return lambda: landmark.grouped_landmark_attention(state, q, k, v, 128 ** -0.5, None, 5)


def _dma(T, hkv, lists):
    from patchattn.methods import dma

    bias = torch.randn(1, hkv, T, generator=torch.Generator().manual_seed(0))

    def call():
        until = dma.kept_until(bias, 2048, 1.0)
        return dma.dynamic_mask_lists(until, 0, T // 64, 64, T) if lists else until
    return call


def one(case: str, T: int, hq: int, hkv: int) -> dict:
    fn = _landmark(T, hq, hkv) if case == "landmark" else _dma(T, hkv, case == "dma_lists")
    before = _rss_bytes()
    with torch.no_grad():
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"case": case, "T": T, "heads": f"{hq}/{hkv}", "seconds": round(seconds, 3),
            "peak_mb": round(max(0, peak) / 2**20), "threads": torch.get_num_threads()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", help="case,T,hq,hkv (internal: one case in this process)")
    p.add_argument("--label", default="", help="a name for the imported tree, written in each row")
    p.add_argument("--csv", help="write the rows here")
    args = p.parse_args(argv)
    if args.one:
        case, *sizes = args.one.split(",")
        print(json.dumps(one(case, *map(int, sizes))))
        return
    import patchattn

    print(f"patchattn: {patchattn.__file__}", flush=True)
    rows = []
    for case, T, hq, hkv in CASES:
        run = subprocess.run([sys.executable, __file__, "--one", f"{case},{T},{hq},{hkv}"], capture_output=True,
                             text=True, check=False)
        row = json.loads(run.stdout.splitlines()[-1]) if run.returncode == 0 else {
            "case": case, "T": T, "heads": f"{hq}/{hkv}", "error": (run.stderr.strip().splitlines() or ["?"])[-1]}
        row["tree"] = args.label
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.csv:
        fields = ["tree", "case", "T", "heads", "seconds", "peak_mb", "threads", "error"]
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
