"""Offline text and synthetic prompts shared by eval, tasks, calibrate, bench, train and the demo.

* ``offline_text`` / ``text_token_ids``: CPython's ``pydoc_data`` topics (~1 MB of English technical prose that
  ships with every CPython, so nothing is ever downloaded), the source of a fixed list of standard-library
  modules (Python code: a second kind of text) or a local file.
* ``FILLER`` and the passkey prompt (the task of the Landmark Attention paper, used by HiP, StreamingLLM and
  LongLoRA): a 5-digit number hidden at a depth of repeated filler, asked for at the end.
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass

import torch

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_QUESTION = " What is the pass key? The pass key is"


# A second offline text of another kind (Python code, not prose): quality varies with the text, so results are
# reported on both.  Modules of the standard library, in a fixed order; their source ships with every CPython.
STDLIB_MODULES = ("argparse", "dataclasses", "typing", "inspect", "pathlib", "collections", "enum", "functools",
                  "logging", "json.decoder", "json.encoder", "textwrap", "difflib", "tarfile", "zipfile", "email.message")
TEXTS = ("pydoc", "stdlib")


def offline_text(source: str = "pydoc") -> str:
    """Long text available offline: ``"pydoc"`` (CPython's pydoc topics, English technical prose, ~1 MB),
    ``"stdlib"`` (the source of ``STDLIB_MODULES``, Python code, ~1 MB) or a file path."""
    if source == "pydoc":
        from pydoc_data import topics  # a 1 MB module: loaded only when the text is read

        return "\n\n".join(topics.topics[key] for key in sorted(topics.topics))
    if source == "stdlib":
        return "\n\n".join(_module_source(name) for name in STDLIB_MODULES)
    with open(source, encoding="utf-8") as handle:
        return handle.read()


def _module_source(name: str) -> str:
    """The source text of a standard-library module, read from its file (nothing is imported)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise ValueError(f"standard-library module {name!r} has no Python source here")
    with open(spec.origin, encoding="utf-8") as handle:
        return handle.read()


# Tokenising the ~1 MB pydoc text takes seconds: keep one copy per (tokenizer, source) for the process.
_TOKENISED: dict = {}


def all_token_ids(tokenizer, source: str = "pydoc") -> torch.Tensor:
    """``[1, N]`` token ids of the whole offline text (as ``tokenizer(text)`` gives them), tokenised once."""
    key = (id(tokenizer), source)
    cached = _TOKENISED.get(key)
    if cached is None or cached[0] is not tokenizer:
        cached = (tokenizer, tokenizer(offline_text(source), return_tensors="pt").input_ids)
        _TOKENISED[key] = cached
    return cached[1]


def text_token_ids(tokenizer, n_tokens: int, source: str = "pydoc", offset: int = 0) -> torch.Tensor:
    """``[1, n_tokens]`` token ids of the offline text starting at token ``offset``."""
    ids = all_token_ids(tokenizer, source)
    if ids.shape[1] < offset + n_tokens:
        raise ValueError(f"the text has only {ids.shape[1]} tokens; asked for {n_tokens} from offset {offset}")
    return ids[:, offset : offset + n_tokens]


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
    fixed = len(tokenizer(needle + PASSKEY_QUESTION).input_ids)
    filler_ids = tokenizer(FILLER).input_ids
    n_filler = max(1, (length - fixed) // len(filler_ids))
    before = round(n_filler * depth)
    return FILLER * before + needle + FILLER * (n_filler - before) + PASSKEY_QUESTION, key


def passkey_example(tokenizer, length: int, depth: float, seed: int = 0) -> PasskeyExample:
    """A passkey prompt of about ``length`` tokens with the key at ``depth`` (0 = start, 1 = end) of the filler."""
    text, key = passkey_prompt(tokenizer, length, depth, seed)
    ids = tokenizer(text, return_tensors="pt").input_ids
    return PasskeyExample(ids, key, length, depth)


def filler_ids(tokenizer, n_tokens: int) -> list[int]:
    """``n_tokens`` ids of the repeated filler sentence (no special tokens)."""
    unit = tokenizer(FILLER, add_special_tokens=False).input_ids
    return (unit * (n_tokens // len(unit) + 1))[:n_tokens]
