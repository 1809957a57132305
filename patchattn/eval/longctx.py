"""Synthetic long-context tasks, generated deterministically from a seed (no data download).

``passkey``: a 5-digit number hidden at a given depth in repeated filler text, asked for at the end (the task of
the Landmark Attention paper, used by HiP, StreamingLLM and LongLoRA).  The model must complete
"The pass key is" with the number; greedy decoding, exact match.
"""

from __future__ import annotations

import torch

from ..data import FILLER, PASSKEY_QUESTION, PasskeyExample, passkey_example, passkey_prompt

QUESTION = PASSKEY_QUESTION
__all__ = ["FILLER", "QUESTION", "PasskeyExample", "answer_passkey", "passkey_example", "passkey_prompt"]


@torch.no_grad()
def answer_passkey(model, tokenizer, example: PasskeyExample, max_new_tokens: int = 8) -> tuple[bool, str]:
    """(exact match, generated text) for one example, greedy, through the KV cache (so decode paths run)."""
    ids = example.input_ids.to(model.device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    digits = "".join(ch for ch in text.strip().split(".")[0] if ch.isdigit())
    return digits == example.answer, text
