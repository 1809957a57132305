"""Registered attention methods: one file per method; importing a file registers it."""

from . import blocktopk, dense, duo, hip, hyper, moa, moh, power, s2, streaming
