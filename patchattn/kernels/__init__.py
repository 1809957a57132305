"""Attention kernels: one folder per kernel with its pure-torch reference (``blocksparse``, ``blockselect``,
``colclass``, ``dense``, ``hedgehog``, ``landmark``, ``lightning``, ``received``), and the launch options they
share (:class:`KernelOptions`, :func:`kernel_options`)."""
from .options import KernelOptions, current_options, kernel_options

__all__ = ["KernelOptions", "current_options", "kernel_options"]
