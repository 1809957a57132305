"""Write ``method_pins.safetensors``: what every method computes today on fixed inputs of a tiny Llama.

The file pins behaviour across refactors (``tests/methods/test_pinned_outputs.py`` recomputes and compares): the
prefill logits, each layer's reported density and the greedy tokens of a short generation (decode steps through
the KV cache).  Regenerate only when a method's behaviour is *meant* to change, and say so in the commit:

    python tests/data/make_pins.py
"""

from __future__ import annotations

import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pin_cases import PIN_CASES, run_case  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "method_pins.safetensors")


def main() -> None:
    tensors = {}
    for name in PIN_CASES:
        for key, value in run_case(name).items():
            tensors[f"{name}/{key}"] = value.contiguous()
        print(name, flush=True)
    save_file(tensors, OUT, metadata={"torch": torch.__version__})
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
