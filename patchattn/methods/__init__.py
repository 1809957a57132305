"""Registered attention methods: one file per method; importing a file registers it."""

from . import act, blocktopk, dense, duo, headscale, hip, hyper, moa, moh, power, s2, streaming
from . import longlora, sinklora  # fine-tuning methods (recipes/)
