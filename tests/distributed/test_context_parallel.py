"""Context-parallel prefill on two CPU processes (gloo) equals the one-process prefill, method by method.

Oracle: the same patched model's ordinary prefill on the whole prompt, in each process.  The prompt (133 tokens,
blocks of 16) ends in a partial block; the tiny Llama has GQA; each sparse method is set to read a strict subset
of the blocks (checked: its logits differ from dense), so a chunk that selected differently would show.
"""

from __future__ import annotations

from .cp_cases import METHODS, check_prefill, run_two_ranks


def test_all_gather_zigzag_equals_one_process_for_each_method():
    run_two_ranks(check_prefill, tuple(METHODS), "zigzag", "allgather", {})
