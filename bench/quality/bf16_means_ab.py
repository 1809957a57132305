"""A/B of the compressed key cache's dtype on a bf16 model (CPU): `blocktopk` with its key-block means stored in the
keys' dtype (the default since 2026-11-29) against fp32 means (before).  Prefill perplexity only, so only the
prefill's means matter.

    python3 bench/quality/bf16_means_ab.py --model smollm2 --dtype bfloat16 --methods 'dense;blocktopk' \
        --ppl-lengths 4096,8192 --passkey-lengths "" --json bench/quality/smollm2_bf16_means.json
    python3 bench/quality/bf16_means_ab.py --fp32-means --model smollm2 --dtype bfloat16 \
        --methods 'blocktopk@fp32means:{}' --ppl-lengths 4096,8192 --passkey-lengths "" \
        --json bench/quality/smollm2_bf16_means.json --resume
"""
import sys

from patchattn.bench import quality
from patchattn.methods import blocktopk


def fp32_key_block_means(state, key, block, q_len):
    """The means as they were kept before: summed and stored in fp32 (no decode-time cache needed here)."""
    return blocktopk.block_means(key, block)


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--fp32-means" in argv:
        argv.remove("--fp32-means")
        blocktopk.key_block_means = fp32_key_block_means
    sys.exit(quality.main(argv))
