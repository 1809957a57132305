"""Registered attention methods: one file per method; importing a file registers it."""

from . import blocktopk, dense, hip, power, s2, streaming  # noqa: F401
