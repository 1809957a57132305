"""Case builders and the one tolerance table shared by the block-sparse kernel tests."""
from __future__ import annotations

import importlib
import math
import os
import sys
from dataclasses import dataclass, replace

import torch

try:
    from patchattn import kernels
except ImportError:  # a bare GPU box without patchattn's other dependencies: load the kernels package alone
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "patchattn"))
    import kernels  # type: ignore[no-redef]
bs = importlib.import_module(kernels.__name__ + ".blocksparse")
KernelOptions, kernel_options = kernels.KernelOptions, kernels.kernel_options

blocks_from_mask = bs.blocks_from_mask

# Largest allowed |actual - expected|, relative to max |expected|, per dtype and quantity.
TOLERANCE = {
    torch.float64: {"out": 1e-10, "lse": 1e-10, "grad": 1e-9},
    torch.float32: {"out": 2e-5, "lse": 2e-5, "grad": 2e-4},
    torch.float16: {"out": 4e-3, "lse": 1e-3, "grad": 1.5e-2},
    torch.bfloat16: {"out": 2.5e-2, "lse": 5e-3, "grad": 6e-2},
}


@dataclass(frozen=True)
class Case:
    B: int = 1
    Hq: int = 2
    Hkv: int = 2
    Tq: int = 64
    Tk: int = 64
    D: int = 32
    block_q: int = 16
    block_k: int = 16
    list_heads: str = "q"    # "1" | "kv" | "q": which heads share a block list
    list_batch: bool = True  # per-batch lists (else one list for the batch)
    causal: bool = True
    density: float = 0.5

    def with_(self, **kw):
        return replace(self, **kw)

    def __str__(self):
        return (f"B{self.B}-H{self.Hq}/{self.Hkv}-T{self.Tq}x{self.Tk}-D{self.D}-b{self.block_q}x"
                f"{self.block_k}-L{self.list_heads}{'b' if self.list_batch else ''}-"
                f"{'causal' if self.causal else 'full'}-d{self.density}")


def make_qkv(case: Case, dtype, device, gen: torch.Generator):
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

    q = randn(case.B, case.Hq, case.Tq, case.D)
    k = randn(case.B, case.Hkv, case.Tk, case.D)
    v = randn(case.B, case.Hkv, case.Tk, case.D)
    return q, k, v


def random_blocks(case: Case, device, gen: torch.Generator):
    """Random block lists with the corner cases planted: an empty row, a full row, a single block."""
    heads = {"1": 1, "kv": case.Hkv, "q": case.Hq}[case.list_heads]
    batch = case.B if case.list_batch else 1
    n_q, n_k = math.ceil(case.Tq / case.block_q), math.ceil(case.Tk / case.block_k)
    mask = torch.rand(batch, heads, n_q, n_k, generator=gen) < case.density
    mask[0, 0, 0] = False                      # empty row
    if n_q > 1:
        mask[0, 0, 1] = True                   # full row
    if n_q > 2:
        mask[0, 0, 2] = False
        mask[0, 0, 2, n_k // 2] = True         # single block
    mask[..., -1, -1] = True                   # decode rows see the newest block
    idx, cnt = blocks_from_mask(mask)
    return idx.to(device), cnt.to(device)


def padding_bounds(case: Case, device, gen: torch.Generator):
    """Left padding on every sequence but the first, a right cut on the last."""
    start = torch.randint(0, max(1, case.Tk // 3), (case.B,), generator=gen, dtype=torch.int32)
    start[0] = 0
    end = torch.full((case.B,), case.Tk, dtype=torch.int32)
    end[-1] = case.Tk - case.Tk // 5
    return start.to(device), end.to(device)


def assert_close(actual, expected, dtype, kind, name=""):
    """|actual - expected| <= tol * max|expected|, with -inf matched exactly and no NaN."""
    tol = TOLERANCE[dtype][kind]
    a, e = actual.double(), expected.double()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert not torch.isnan(a).any(), f"{name}: {int(torch.isnan(a).sum())} NaN (unwritten output?)"
    inf_a, inf_e = torch.isinf(a), torch.isinf(e)
    assert torch.equal(inf_a, inf_e) and torch.equal(a[inf_a], e[inf_e]), f"{name}: inf pattern differs"
    a, e = a[~inf_e], e[~inf_e]
    if e.numel() == 0:
        return
    scale = max(e.abs().max().item(), 1e-6)
    err = (a - e).abs().max().item()
    assert err <= tol * scale, f"{name}: max error {err:.3e} > {tol:.1e} x {scale:.3e} ({dtype})"
