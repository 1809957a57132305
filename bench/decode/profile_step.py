"""Kernel-by-kernel device time of one decode step (torch.profiler, CUPTI), to tell kernel time from launch gaps.

    PYTHONPATH=. python3 bench/decode/profile_step.py > bench/decode/profile_step.log
"""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from patchattn.bench.methods import _decode_steps, _select, _state


def profile_step(method: str, overrides: dict, batch: int = 1, T: int = 131072, steps: int = 20) -> None:
    q = torch.randn(batch, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, 8, T, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    state = _state(method, overrides)
    _select(method, state, q[:, :, :1].expand(-1, -1, 2, -1), k)
    step = next(iter(_decode_steps(method, state, q, k, v).values()))
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    print(f"== {method} {overrides} B={batch} T={T}: device time per step, by kernel (us)")
    total = 0.0
    for event in sorted(prof.key_averages(), key=lambda e: -e.device_time_total):
        per_step = event.device_time_total / steps
        if per_step > 0:
            total += per_step
            print(f"{per_step:8.1f}  x{event.count / steps:.0f}  {event.key[:110]}")
    print(f"{total:8.1f}  total kernel time per step")


if __name__ == "__main__":
    import sys

    from patchattn.kernels.blockselect import triton_select

    with torch.no_grad():
        if "--warps" in sys.argv:  # the selection kernels' warps per program, score precision, pivot rule
            for score_warps, select_warps, precision, search in ((4, 4, "ieee", "keys"), (4, 4, "tf32x3", "keys"),
                                                                 (8, 4, "tf32x3", "keys"), (4, 4, "tf32", "keys"),
                                                                 (4, 4, "tf32x3", "values")):
                triton_select.SCORE_WARPS, triton_select.SELECT_WARPS = score_warps, select_warps
                triton_select.SCORE_PRECISION, triton_select.SELECT_SEARCH = precision, search
                print(f"-- scores kernel {score_warps} warps {precision}, select kernel {select_warps} warps, {search}")
                profile_step("blocktopk", {})
        else:
            for method, overrides in (("blocktopk", {}), ("blocktopk", {"per_head": False}), ("streaming", {})):
                profile_step(method, overrides)
