"""Shared setup for the kernel tests.

Without CUDA the Triton tests run under the interpreter: ``TRITON_INTERPRET=1`` is set for the
duration of the Triton test modules only (the kernels are compiled lazily, at first use, so this is
early enough), which keeps ``backend="auto"`` on the torch path for every other test in the session.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def triton_device():
    """'cuda' on a GPU machine; otherwise 'cpu' with the Triton interpreter switched on."""
    pytest.importorskip("triton", reason="triton is not installed: Triton kernel tests skipped")
    if HAS_CUDA:
        yield "cuda"
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    yield "cpu"
    if old is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = old


@pytest.fixture(autouse=True)
def poison_outputs():
    """Every kernel output starts NaN-filled, so an element left unwritten fails the comparison; on a GPU the first
    fitting launch config is taken instead of timing them all (the kernels are checked, not timed, here)."""
    from blocksparse_cases import kernel_options

    with kernel_options(poison_outputs=True, autotune=False):
        yield
