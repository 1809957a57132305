"""Where an eager decode step's time goes (CUDA GPU): kept as a short way to run
``patchattn bench generate --profile-step OUT`` (patchattn/bench/generate_profile.py): one eager decode step per
method after a prefill, its median wall time, the host time split between patchattn, transformers and torch (with
the C/C++ calls each makes), the top host-side operators and the device kernels. Writes OUT.json and OUT.md.

    python bench/generate/profile_step.py bench/generate/profile_step [--layers 32] [--lengths 32768] \
        [--methods dense,hip,blocktopk,streaming,duo]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from patchattn.bench.generate import main  # noqa: E402

if __name__ == "__main__":
    out, *rest = sys.argv[1:] or [str(Path(__file__).with_name("profile_step"))]
    defaults = ["--layers", "32", "--lengths", "32768", "--methods", "dense,hip,blocktopk,streaming,duo"]
    raise SystemExit(main([*defaults, *rest, "--profile-step", out]))
