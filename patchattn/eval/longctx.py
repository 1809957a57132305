"""Synthetic long-context tasks, generated deterministically from a seed (no data download).

``passkey``: a 5-digit number hidden at a given depth in repeated filler text, asked for at the end (the task of
the Landmark Attention paper, used by HiP, StreamingLLM and LongLoRA).  The model must complete
"The pass key is" with the number; greedy decoding, exact match.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = " What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyExample:
    input_ids: torch.Tensor  # [1, T], T close to ``length``
    answer: str
    length: int  # the length asked for
    depth: float


def passkey_prompt(tokenizer, length: int, depth: float, seed: int = 0) -> tuple[str, str]:
    """(prompt text of about ``length`` tokens with the key at ``depth`` of the filler, the key)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(f"{seed}-{length}-{depth}")
    key = str(rng.randint(10000, 99999))
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    fixed = len(tokenizer(needle + QUESTION).input_ids)
    filler_ids = tokenizer(FILLER).input_ids
    n_filler = max(1, (length - fixed) // len(filler_ids))
    before = round(n_filler * depth)
    return FILLER * before + needle + FILLER * (n_filler - before) + QUESTION, key


def passkey_example(tokenizer, length: int, depth: float, seed: int = 0) -> PasskeyExample:
    """A passkey prompt of about ``length`` tokens with the key at ``depth`` (0 = start, 1 = end) of the filler."""
    text, key = passkey_prompt(tokenizer, length, depth, seed)
    ids = tokenizer(text, return_tensors="pt").input_ids
    return PasskeyExample(ids, key, length, depth)


@torch.no_grad()
def answer_passkey(model, tokenizer, example: PasskeyExample, max_new_tokens: int = 8) -> tuple[bool, str]:
    """(exact match, generated text) for one example, greedy, through the KV cache (so decode paths run)."""
    ids = example.input_ids.to(model.device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    digits = "".join(ch for ch in text.strip().split(".")[0] if ch.isdigit())
    return digits == example.answer, text
