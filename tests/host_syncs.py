"""Count the host-device synchronisations of a forward on the CPU (tests; no GPU needed).

A ``TorchDispatchMode`` sees every aten op; the ones whose result the host must wait for on a GPU are counted:
scalar reads (``item``, ``bool()``, ``int()``, ``float()`` -> ``_local_scalar_dense``), ops whose output size
depends on the data (``nonzero``, ``masked_select``, ``unique``, boolean-mask indexing, ``repeat_interleave`` with a
tensor of repeats), and ``Tensor.tolist`` (read in C++ without dispatching, so wrapped here).

Host data placed on a device is counted too (``host-copy``): ``torch.tensor`` / ``torch.as_tensor`` given a ``device``
(or ``Tensor.new_tensor``, which takes its tensor's device).  On a GPU such a copy comes from pageable memory without
``non_blocking``, and PyTorch ends it with a stream synchronize: the host waits for every queued kernel, as for a
scalar read.  A CPU run cannot see it as a device change (it is none there), so the calls are wrapped and counted by
what they ask for.  Not seen: ``cpu_tensor.to(device)`` of a tensor kept on the CPU (a no-op on a CPU run, so
nothing dispatches); the LVLM methods' per-call code was read for those (design note 54).
"""

from __future__ import annotations

import collections
import contextlib
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Host reads that only the CPU runs: the block-sparse engine's pure-torch reference (a GPU runs the Triton kernel)
# and its CPU-only value check of the tile ids.  Not counted, so a count is what a GPU forward would wait for.
CPU_ONLY = (("kernels/blocksparse/reference.py", None), ("kernels/blocksparse/__init__.py", "_validate_tiles"))
SCALAR_READS = {"_local_scalar_dense", "is_nonzero", "equal", "allclose"}
SIZED_BY_DATA = {"nonzero", "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive",
                 "unique_dim_consecutive", "masked_scatter"}


def _is_sync(func, args) -> bool:
    name = func.overloadpacket.__name__
    if name in SCALAR_READS or name in SIZED_BY_DATA:
        return True
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else ()
        return any(torch.is_tensor(i) and i.dtype == torch.bool for i in indices if i is not None)
    if name == "repeat_interleave":
        return len(args) > 1 and torch.is_tensor(args[1]) and args[1].numel() > 1
    return False


class SyncCounter(TorchDispatchMode):
    """``with SyncCounter(where=("patchattn",)) as c: model(...)``; ``c.count``: the syncs, ``c.sites`` where they
    were issued (the innermost stack frame whose file path contains one of ``where``; '' counts every sync)."""

    def __init__(self, where: tuple[str, ...] = ("",)):
        super().__init__()
        self.where = where
        self.sites: collections.Counter = collections.Counter()

    @property
    def count(self) -> int:
        return sum(self.sites.values())

    def _record(self, what: str) -> None:
        for frame in reversed(traceback.extract_stack()[:-2]):
            if "host_syncs.py" in frame.filename or "torch/" in frame.filename and "site-packages" in frame.filename:
                continue
            if any(frame.filename.endswith(f) and name in (None, frame.name) for f, name in CPU_ONLY):
                return
            if any(w in frame.filename for w in self.where):
                self.sites[f"{what} {frame.filename.rsplit('/', 2)[-1]}:{frame.lineno}"] += 1
            return

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _is_sync(func, args):
            self._record(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        counter = self
        self._originals = [(torch.Tensor, "tolist", torch.Tensor.tolist), (torch, "tensor", torch.tensor),
                           (torch, "as_tensor", torch.as_tensor), (torch.Tensor, "new_tensor", torch.Tensor.new_tensor)]
        tolist, tensor, as_tensor, new_tensor = (original for _, _, original in self._originals)

        def counted_tolist(t):
            counter._record("tolist")
            return tolist(t)

        def placed(make, name):
            def wrapper(*args, **kwargs):
                out = make(*args, **kwargs)
                if kwargs.get("device") not in (None, "cpu") and out.numel():  # an empty copy returns at once
                    counter._record(f"host-copy {name}")
                return out
            return wrapper

        def counted_new_tensor(t, *args, **kwargs):
            out = new_tensor(t, *args, **kwargs)
            if out.numel():
                counter._record("host-copy new_tensor")
            return out

        torch.Tensor.tolist = counted_tolist
        torch.tensor, torch.as_tensor = placed(tensor, "torch.tensor"), placed(as_tensor, "torch.as_tensor")
        torch.Tensor.new_tensor = counted_new_tensor
        return super().__enter__()

    def __exit__(self, *exc):
        for owner, name, original in self._originals:
            setattr(owner, name, original)
        return super().__exit__(*exc)


@contextlib.contextmanager
def counting(where=("patchattn",)):
    with SyncCounter(where) as counter:
        yield counter
