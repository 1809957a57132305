"""Registered attention methods: one file per method; importing a file registers it."""

from . import blocktopk, dense, duo, hip, hyper, moa, power, s2, streaming
