"""lm-eval glue for the offline tasks (the YAML files here name these functions with ``!function utils.<name>``).

lm-eval loads this file by path, not as part of the package, so imports are absolute.  Each ``*_dataset`` function
receives the task metadata: lm-eval merges the model arguments (``pretrained``, ``tokenizer``, ``max_length``...)
with ``--metadata`` (``lengths``, ``depths``, ``samples``, ``seed``), as it does for its own RULER tasks.
"""

from __future__ import annotations

import logging

import datasets
from transformers import AutoConfig

from patchattn.models import EMBEDDED
from patchattn.tasks import generators as gen

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Reading the metadata
# --------------------------------------------------------------------------------------------------------------
def tokenizer_from(meta: dict):
    """The tokenizer named by ``tokenizer`` or ``pretrained`` in the metadata (strings only)."""
    for key in ("tokenizer", "pretrained"):
        value = meta.get(key)
        if isinstance(value, str) and value:
            return gen.load_tokenizer(value)
    raise ValueError(
        "the patchattn tasks size their prompts with the model's tokenizer: pass pretrained=<smollm2|gemma3-270m|"
        "path> in --model_args, or --metadata '{\"tokenizer\": \"<name or path>\"}' (from Python: "
        "TaskManager(metadata={'tokenizer': ...}))"
    )


def max_context(meta: dict) -> int | None:
    """The model's context in tokens: ``max_length`` if given, else the model config's, else None (no cap)."""
    if meta.get("max_length"):
        return int(meta["max_length"])
    name = meta.get("pretrained")
    if not isinstance(name, str):
        return None
    return context_of(name)


def context_of(name: str) -> int | None:
    known = {"smollm2": 8192, "gemma3-270m": 32768}  # their GGUF configs say so; reading them takes seconds
    if name in EMBEDDED:
        return known.get(name)
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError):
        return None
    config = getattr(config, "text_config", None) or config
    return getattr(config, "max_position_embeddings", None)


def grid(meta: dict, *, samples: int) -> dict:
    lengths = gen.as_list(meta.get("lengths"), int) or list(gen.DEFAULT_LENGTHS)
    return {
        "lengths": gen.cap_lengths(lengths, max_context(meta)),
        "depths": gen.as_list(meta.get("depths"), float) or list(gen.DEFAULT_DEPTHS),
        "samples": int(meta.get("samples", samples)),
        "seed": int(meta.get("seed", 0)),
    }


def _dataset(docs: list[dict]) -> dict:
    # Arrow needs one type per column: depth is None for tasks without one.
    for doc in docs:
        if doc.get("depth") is None:
            doc["depth"] = -1.0
    return {"test": datasets.Dataset.from_list(docs, split=datasets.Split.TEST)}


# --------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------
def passkey_dataset(**meta) -> dict:
    g = grid(meta, samples=1)
    return _dataset(gen.passkey_docs(tokenizer_from(meta), g["lengths"], g["depths"], samples=g["samples"],
                                     seed=g["seed"]))


def needle_dataset(**meta) -> dict:
    g = grid(meta, samples=1)
    return _dataset(gen.needle_docs(tokenizer_from(meta), g["lengths"], g["depths"], samples=g["samples"],
                                    keys=int(meta.get("keys", 4)), seed=g["seed"]))


def vartrack_dataset(**meta) -> dict:
    g = grid(meta, samples=4)
    return _dataset(gen.vartrack_docs(tokenizer_from(meta), g["lengths"], samples=g["samples"],
                                      hops=int(meta.get("hops", 4)), chains=int(meta.get("chains", 1)),
                                      seed=g["seed"]))


def ppl_dataset(**meta) -> dict:
    g = grid(meta, samples=1)
    return _dataset(gen.ppl_docs(tokenizer_from(meta), g["lengths"], samples=g["samples"], seed=g["seed"]))


# --------------------------------------------------------------------------------------------------------------
# Scoring: an overall metric plus one per length (a document only reports its own length's metric)
# --------------------------------------------------------------------------------------------------------------
def _per_length(doc: dict, name: str, score: float) -> dict:
    return {name: score, f"{name}_{doc['length']}": score}


def score_number(doc: dict, results: list[str]) -> dict:
    """Exact match of the first number in the generation (passkey, needle)."""
    return _per_length(doc, "acc", float(gen.first_number(results[0]) == doc["answer"]))


def score_variables(doc: dict, results: list[str]) -> dict:
    """Fraction of the asked variables named in the generation (RULER's string_match_all)."""
    return _per_length(doc, "acc", gen.fraction_found(results[0], doc["variables"]))
