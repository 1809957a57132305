"""Count the aten ops one method function queues on the CPU, and the tensors ops make (tests; no GPU needed).

At short prefills and in decode steps a forward is host-bound, so the ops a method adds per layer are host time.
``MethodOps(function)`` counts the ops issued inside ``function`` but not inside ``dense_call`` (the unpatched
attention) nor inside a kernel's own code (its pure-torch reference or Triton's interpreter: a GPU runs one launch).
"""

from __future__ import annotations

import collections
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

KERNEL_CODE = ("/kernels/colclass/reference.py", "/kernels/blocksparse/reference.py", "/triton/")


class MethodOps(TorchDispatchMode):
    """``with MethodOps("var_attention") as c: model(...)``; ``c.ops``: a Counter of aten op names."""

    def __init__(self, function: str):
        super().__init__()
        self.function = function
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        frame = sys._getframe(1)
        while frame is not None:
            name, path = frame.f_code.co_name, frame.f_code.co_filename
            if name == "dense_call" or any(part in path for part in KERNEL_CODE):
                break
            if name == self.function:
                self.ops[func.overloadpacket.__name__] += 1
                break
            frame = frame.f_back
        return func(*args, **(kwargs or {}))


class Allocations(TorchDispatchMode):
    """``with Allocations() as a: ...``; ``a.sizes``: the element counts of the new tensors the ops make (outputs on
    a storage none of the op's inputs has: views and in-place results are not counted)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = lambda tree: [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in tensors((args, kwargs))}
        self.sizes += [t.numel() for t in tensors(out) if t.untyped_storage().data_ptr() not in inputs]
        return out
