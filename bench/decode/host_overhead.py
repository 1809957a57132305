# On any machine (CPU is enough): python3 bench/decode/host_overhead.py [method ...] > host_overhead_cpu.log
"""Python time of one eager decode step of a sparse method (selection + attention), with every Triton kernel launch
stubbed out (TRITON_INTERPRET=1 and the interpreter's run replaced by a no-op): what our own code costs per step on
the host, apart from Triton's launch path and the GPU. 32k-token cache, batch 1, 32 q / 8 kv heads, head_dim 128,
bf16 CPU tensors (the CPU allocator stands in for CUDA's caching allocator)."""
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"
import torch  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402

LAUNCHES = []


def _count_launch(self, *args, **kwargs):
    LAUNCHES.append(getattr(self.fn, "__name__", "?"))


interpreter.InterpretedFunction.run = _count_launch
from patchattn.bench import methods as bench  # noqa: E402


def host_us(name, T=32768, steps=50):
    q = torch.randn(1, 32, 1, 128, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, T, 128, dtype=torch.bfloat16) for _ in range(2))
    state = bench._state(name, {"backend": "triton"})
    step = next(iter(bench._decode_steps(name, state, q, k, v).values()))
    for _ in range(3):
        step()
    LAUNCHES.clear()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps * 1e6, len(LAUNCHES) / steps, sorted(set(LAUNCHES))


if __name__ == "__main__":
    for name in sys.argv[1:] or ["streaming", "blocktopk", "hip"]:
        us, launches, kernels = host_us(name)
        print(f"{name}: {us:.0f} us of Python per eager decode step, {launches:.0f} Triton launches ({', '.join(kernels)})")
