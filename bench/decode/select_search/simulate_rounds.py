"""Rounds of the decode top-k's k-th-value search, simulated on the CPU (numpy): pivots halving the interval of
order-preserving integer keys ("keys") vs every other pivot halving the interval of values ("values", the default
of kernels/blockselect/triton_select.py), both stopping at a pivot with exactly k candidates at or above it.

    python3 bench/decode/select_search/simulate_rounds.py > bench/decode/select_search/simulate_rounds.txt
"""
import numpy as np


def keys_of(values):
    bits = np.asarray(values, dtype=np.float32).view(np.int32).astype(np.int64)
    return np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def value_of(key):
    bits = key ^ 0x7FFFFFFF if key < 0 else key
    return np.array(bits, dtype=np.int64).astype(np.int32).view(np.float32).item()


def rounds(scores, k, value_midpoints):
    keys = keys_of(scores)
    need, lo, hi = min(k, len(keys)), int(keys.min()), int(keys.max())
    n, by_value = 0, True
    while lo < hi:
        pivot = lo + (hi - lo + 1) // 2
        if value_midpoints and by_value:
            low = value_of(lo)
            pivot = min(max(int(keys_of(np.float32(low + (value_of(hi) - low) * 0.5))), lo + 1), hi)
        by_value = not by_value
        count = int((keys >= pivot).sum())
        n += 1
        lo, hi = (pivot, hi) if count >= need else (lo, pivot - 1)
        if count == need:
            hi = lo
    return n


def main():
    rng = np.random.default_rng(0)
    rows = {"gaussian": lambda: rng.standard_normal(2021) * 3,
            "narrow (mean 1, sd 0.05)": lambda: rng.standard_normal(2021) * 0.05 + 1,
            "cauchy (heavy tails)": lambda: rng.standard_cauchy(2021),
            "gaussian + two +-1e30 outliers": lambda: np.concatenate([rng.standard_normal(2019), [-1e30, 1e30]])}
    print("row of 2021 candidate scores, k | mean rounds: keys | values")
    for name, draw in rows.items():
        for k in (24, 500):
            keys = np.mean([rounds(draw(), k, False) for _ in range(50)])
            values = np.mean([rounds(draw(), k, True) for _ in range(50)])
            print(f"{name}, k={k} | {keys:.1f} | {values:.1f}")


if __name__ == "__main__":
    main()
