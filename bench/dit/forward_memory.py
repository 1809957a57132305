"""Peak memory of one unpatched ``bench dit`` forward (no grad), estimated on the CPU without a GPU: the model and
its inputs are fake tensors (no data), and a dispatch mode adds up the bytes of the storages alive after each op.

    python bench/dit/forward_memory.py hunyuan-720p --layers 4      # repository root as cwd

Checked against the peaks the H200 runs stamped in their forward rows (4 blocks, bf16): Wan 720p 11.08 GiB here vs
11.1 measured, FLUX-4K 6.43 vs 6.5, FLUX 1024² 5.22 vs 5.3.  Not counted: the CUDA allocator's rounding and
workspaces, and a patched method's own buffers (its permuted q/k/v and plan).  SDPA is the CPU's fused kernel here,
so no [heads, T, T] score tensor appears, as with the fused kernels on a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, os.getcwd())
from patchattn.bench import dit

GIB = 2**30


class LiveBytes(TorchDispatchMode):
    """The bytes of the storages alive (created by an op, or tracked by hand) and their peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.largest = 0
        self.sizes: dict[int, int] = {}

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key not in self.sizes:  # a view shares its base's storage: counted once
            self.sizes[key] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak, self.largest = max(self.peak, self.live), max(self.largest, storage.nbytes())
            weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.track(value)
        return out


def estimate(shape: dit.Shape, layers: int, dtype=torch.bfloat16) -> dict:
    """GiB of the weights, of the peak (weights, inputs and activations) and of the largest single tensor."""
    with FakeTensorMode():
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # built in ``dtype``: fake parameters cannot be swapped by ``.to()``
        try:
            model, inputs, note = dit.MODELS[shape.family](shape, layers, "cpu", dtype)
        finally:
            torch.set_default_dtype(default)
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        counter = LiveBytes()
        for tensor in [*model.parameters(), *model.buffers(), *inputs.values()]:
            counter.track(tensor)
        with counter, torch.no_grad():
            model.eval()(**inputs)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return dict(note=note, tokens=shape.tokens, weights_gib=weights / GIB, peak_gib=counter.peak / GIB,
                largest_gib=counter.largest / GIB)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shapes", help=f"','-separated, of the shapes with a model ({', '.join(dit.SHAPES)})")
    p.add_argument("--layers", type=int, default=4, help="as bench dit's --layers")
    args = p.parse_args(argv)
    for name in args.shapes.split(","):
        r = estimate(dit.SHAPES[name], args.layers)
        print(f"{name} ({r['note']}; {r['tokens']} tokens, bf16, no grad): weights {r['weights_gib']:.2f} GiB, "
              f"peak {r['peak_gib']:.2f} GiB, largest tensor {r['largest_gib']:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
