# Run from the repository root on a CUDA GPU:
#   PYTHONPATH=. python3 bench/kernel/delta_d64/fwd_configs.py old|new <patchattn bench kernel arguments>
"""The forward's autotuning space with ("new") or without ("old") the 128x128-tile, 4-warp config that
FlexAttention uses for head_dim 64 on Hopper; everything else is `patchattn bench kernel` unchanged.

Run once (run1/dropped_fwd_d64_config/): the autotuner chose the same 128x64 / 8-warp config in both arms, so the
config was taken out of triton_fwd again; with it gone both arms now run the same search space."""
import sys

from patchattn.bench import kernel
from patchattn.kernels.blocksparse import triton_fwd

arm, argv = sys.argv[1], sys.argv[2:]
if arm == "old":
    triton_fwd._fwd_tuned.configs = [c for c in triton_fwd._fwd_tuned.configs
                                     if not (c.kwargs["BLOCK_N"] == 128 and c.num_warps == 4)]
elif arm != "new":
    sys.exit("first argument: old or new")
sys.exit(kernel.main(argv))
