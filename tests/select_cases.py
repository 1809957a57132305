"""Prefill block-choice cases shared by the kernel tests and the method-level selection tests."""

import pytest

SELECT_CASES = [  # Tq, Tk, block, per_head, top_k, mass, last_block_dense
    (300, 300, 16, True, 4, 1.0, True),
    (300, 300, 16, False, 4, 0.9, True),  # the adaptive budget
    (200, 500, 16, True, 3, 1.0, False),  # queries at the end of a longer cache
    (250, 250, 32, True, 100, 1.0, True),  # top_k above every row's candidates
    (90, 90, 16, True, 2, 0.5, False),
    pytest.param((8192, 8192, 64, True, 24, 0.97, True), marks=pytest.mark.gpu),  # the default at full size
    pytest.param((3000, 9000, 64, False, 24, 1.0, True), marks=pytest.mark.gpu),
]


def select_case_id(c):
    c = c.values[0] if hasattr(c, "values") else c
    return f"T{c[0]}x{c[1]}-b{c[2]}-{'head' if c[3] else 'group'}-k{c[4]}-m{c[5]}-{'last' if c[6] else 'nolast'}"
