"""Registered attention methods: one file per method; importing a file registers it."""

from . import dense  # noqa: F401
