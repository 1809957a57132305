"""Launch options of the Triton kernels, passed explicitly (``options=``) or scoped (:func:`kernel_options`).

Every kernel entry point (``block_sparse_attention``, the ``blockselect`` entry points) takes ``options=``; ``None``
means the options in effect in the calling context: the defaults below, or what an enclosing
``with kernel_options(...)`` set (for code that cannot pass arguments, e.g. a whole model under a test or a
benchmark).  Nothing here is read from the environment.

Per-shape choices that were measured (the backward's walks and launch order by head_dim, the decode merge's walk
by load rounds, the k-th-value search's pivots) are plain code in the kernels, not options.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KernelOptions:
    """How the Triton kernels launch.  The defaults are what every measurement in the READMEs used."""

    autotune: bool = True
    """Time the candidate launch configs on first use of a shape (GPU); False takes the first config that compiles
    within shared memory (tests, quick runs: no tuning time)."""
    pdl: bool = True
    """Programmatic dependent launch of the decode-step kernels (block scores, block choice, split-K attention) on
    Hopper and newer: each starts while the one before finishes and waits on the device before touching memory."""
    decode_programs_per_sm: int | None = None
    """Programs per SM the split-K decode aims for; None: 1, or 2 for per-head lists while row groups are fewer
    than SMs (bench/decode/RESULTS.md)."""
    dense_fallback: bool = True
    """Compute the full block set with SDPA (``blocksparse`` README, Dispatch); False times the kernels themselves."""
    poison_outputs: bool = False
    """NaN-fill (ints: -1) every buffer a kernel must write, so an element left unwritten fails a comparison."""
    tree_warps: int = 4
    """Warps per program of ``hip``'s prefill tree-search kernel."""
    tree_stages: int = 1
    """Software-pipelining stages of the tree-search kernel (each round depends on the last: 1)."""
    score_warps: int | None = None
    """Warps per program of the decode block-scoring kernel; None: 4."""
    select_warps: int | None = None
    """Warps per program of the decode block-choice kernel; None: 4, or 8 above 4096 blocks."""
    interpreter_tiles: tuple[int, int] | None = None
    """(BLOCK_M, BLOCK_N) sub-tiles under the CPU interpreter (which does not autotune); None: the logical blocks.
    Tests set it to run sub-tiling on a CPU."""
    interpreter_tiles_fastest: bool = False
    """Under the interpreter, launch all tiles of a head together (the other of the forward's two tuned orders)."""
    tile_mask_branch: bool = False
    """Partial tiles' element masks loaded behind a branch per tile (the first version) instead of a predicated load
    the pipeliner can prefetch; for A/B runs (``bench/kernel/engine_sweep.py``)."""
    forward_config: tuple[int, int, int, int, bool] | None = None
    """On a GPU, launch the block-sparse forward with this config instead of the autotuned one: ``(BLOCK_M, BLOCK_N,
    num_warps, num_stages, tiles_fastest)`` (tiles must fit inside the logical blocks); for config sweeps
    (``bench/kernel/engine_sweep.py``) and pinned reproductions.  None: autotuned."""

    def replace(self, **changes) -> KernelOptions:
        return dataclasses.replace(self, **changes)


DEFAULT_OPTIONS = KernelOptions()
_CURRENT: contextvars.ContextVar[KernelOptions] = contextvars.ContextVar("patchattn_kernel_options",
                                                                         default=DEFAULT_OPTIONS)


def current_options() -> KernelOptions:
    """The options in effect here: the defaults, or those of the innermost :func:`kernel_options` block.

    Under ``torch.compile`` they are read once, when the code is traced, and fixed in the compiled graph (Dynamo
    cannot trace a ContextVar read; a graph break there would keep a decode step from compiling whole)."""
    return _scoped_options()


@torch.compiler.assume_constant_result
def _scoped_options() -> KernelOptions:
    return _CURRENT.get()


def resolve_options(options: KernelOptions | None) -> KernelOptions:
    """``options`` when given, else :func:`current_options`."""
    if options is None:
        return _scoped_options()  # current_options(), one call less: every kernel call of every layer asks
    if not isinstance(options, KernelOptions):
        raise TypeError(f"options: expected a KernelOptions or None, got {type(options).__name__}")
    return options


@contextlib.contextmanager
def kernel_options(**changes):
    """Within the block, kernel calls made without ``options=`` use the current options with ``changes`` applied
    (unknown names raise ``TypeError``).  Scoped to this thread / task; nested blocks stack."""
    token = _CURRENT.set(_CURRENT.get().replace(**changes))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)
