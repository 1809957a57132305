"""Offline long-context tasks, generated deterministically from a seed and sized with the model's own tokenizer.

Every generator returns a list of plain dicts (one per example, JSON-serialisable) holding the prompt (``input``),
the expected answer, and the parameters that made it (``length``, ``depth``, ``seed``...), so a result can always
be traced to its cell of the length x depth grid.  The same seed, tokenizer and parameters give the same examples
byte for byte (tests check it).

``length`` is the token budget of prompt plus answer: prompts are built ``GEN_ROOM`` tokens shorter, so a model
whose context is ``length`` never has to truncate them.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import random
import re

from transformers import AutoTokenizer

from ..data import FILLER, offline_text, passkey_prompt
from ..models import EMBEDDED, locate_embedded

log = logging.getLogger(__name__)

DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
GEN_ROOM = 24  # tokens kept free for the answer (the tasks generate at most 16) and a BOS token

# Words used as needle keys and variable names (fixed lists: no vocabulary download, no randomness in the list).
KEY_WORDS = (
    "apple", "river", "candle", "forest", "marble", "violin", "harbor", "lantern", "pepper", "silver", "thunder",
    "garden", "castle", "meadow", "rocket", "pillow", "saddle", "tunnel", "walnut", "zebra", "copper", "falcon",
    "glacier", "island", "jacket", "kettle", "ladder", "mirror", "needle", "orange", "pencil", "quartz",
)


# --------------------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------------------
def as_list(value, cast=float) -> list:
    """A list from a list, a tuple, a number or a comma-separated string (lm-eval metadata arrives in all forms)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [cast(v) for v in value.replace(";", ",").split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return [cast(v) for v in value]
    return [cast(value)]


def cap_lengths(lengths, max_context: int | None) -> list[int]:
    """Lengths that fit the model's context, in increasing order; a clear error when none does."""
    lengths = sorted({int(n) for n in lengths})
    if not lengths:
        raise ValueError("no task lengths given")
    if max_context is None:
        return lengths
    kept = [n for n in lengths if n <= max_context]
    if len(kept) < len(lengths):
        log.warning("patchattn tasks: lengths %s exceed the model's context of %d tokens and are skipped",
                    [n for n in lengths if n > max_context], max_context)
    if not kept:
        raise ValueError(f"every task length {lengths} exceeds the model's context of {max_context} tokens")
    return kept


def check_depths(depths) -> list[float]:
    depths = [float(d) for d in depths]
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if bad or not depths:
        raise ValueError(f"depths must be fractions in [0, 1] (0 = start of the context, 1 = end), got {depths}")
    return depths


# --------------------------------------------------------------------------------------------------------------
# Tokenizers (embedded names never touch the network; their GGUF tokenizer is cached as a plain tokenizer folder)
# --------------------------------------------------------------------------------------------------------------
def _cache_dir() -> str:
    root = os.environ.get("PATCHATTN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "patchattn")
    return os.path.join(root, "tokenizers")


@functools.cache
def load_tokenizer(name_or_path: str):
    """The tokenizer of an embedded model name (``smollm2``, ``gemma3-270m``) or of a local model folder."""
    if name_or_path in EMBEDDED:
        cached = os.path.join(_cache_dir(), name_or_path)
        if os.path.exists(os.path.join(cached, "tokenizer_config.json")):
            return AutoTokenizer.from_pretrained(cached)
        directory, gguf_file = locate_embedded(name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
        try:  # reading the GGUF takes seconds; the saved folder loads in a fraction of that
            tokenizer.save_pretrained(cached)
        except OSError as err:
            log.warning("could not cache the tokenizer in %s: %s", cached, err)
        return tokenizer
    if name_or_path.endswith(".gguf"):
        return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(name_or_path)),
                                             gguf_file=os.path.basename(name_or_path))
    return AutoTokenizer.from_pretrained(name_or_path)


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


# --------------------------------------------------------------------------------------------------------------
# Haystack helpers
# --------------------------------------------------------------------------------------------------------------
def _filler_units(tokenizer, budget: int, fixed_text: str) -> int:
    """How many copies of the filler sentence fit in ``budget`` tokens beside ``fixed_text``."""
    per_unit = n_tokens(tokenizer, FILLER)
    return max(1, (budget - n_tokens(tokenizer, fixed_text)) // per_unit)


def _insert(units: int, inserts: list[tuple[float, str]]) -> str:
    """Filler of ``units`` sentences with each ``(depth, text)`` placed at that fraction of it (stable order)."""
    slots: dict[int, list[str]] = {}
    for depth, text in inserts:
        slots.setdefault(round(units * depth), []).append(text)
    parts = []
    for i in range(units + 1):
        parts.extend(slots.get(i, []))
        if i < units:
            parts.append(FILLER)
    return "".join(parts)


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


# --------------------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------------------
def passkey_docs(tokenizer, lengths, depths=DEFAULT_DEPTHS, *, samples: int = 1, seed: int = 0) -> list[dict]:
    """Passkey retrieval (Landmark Attention's task): a 5-digit key at ``depth`` of repeated filler text."""
    docs = []
    for length in lengths:
        for depth in check_depths(depths):
            for sample in range(samples):
                text, key = passkey_prompt(tokenizer, length - GEN_ROOM, depth, seed=_seed(seed, sample))
                docs.append({"input": text, "answer": key, "length": length, "depth": depth, "sample": sample, "seed": seed})
    return docs


def needle_docs(tokenizer, lengths, depths=DEFAULT_DEPTHS, *, keys: int = 4, samples: int = 1,
                seed: int = 0) -> list[dict]:
    """Multi-key needle: ``keys`` (word, 7-digit number) pairs hidden in the filler; one is asked for.

    The asked needle sits at ``depth``; the distractors at seeded random depths.  A method that reads the right
    region but blurs it (averaged keys, coarse blocks) picks a distractor's number.
    """
    if keys < 1 or keys > len(KEY_WORDS):
        raise ValueError(f"keys must be in [1, {len(KEY_WORDS)}], got {keys}")
    docs = []
    for length in lengths:
        for depth in check_depths(depths):
            for sample in range(samples):
                rng = random.Random(f"needle-{seed}-{sample}-{length}-{depth}")
                words = rng.sample(KEY_WORDS, keys)
                numbers = [_number(rng, 7) for _ in words]
                asked = rng.randrange(keys)
                needles = [(depth if i == asked else rng.random(),
                            f" One of the special magic numbers for {w} is: {n}. ") for i, (w, n) in
                           enumerate(zip(words, numbers))]
                question = (f"\nWhat is the special magic number for {words[asked]} mentioned in the text above? "
                            f"The special magic number for {words[asked]} is")
                head = "Some special magic numbers are hidden in the following text. Memorize them.\n"
                fixed = head + "".join(t for _, t in needles) + question
                units = _filler_units(tokenizer, length - GEN_ROOM, fixed)
                text = head + _insert(units, needles) + question
                docs.append({"input": text, "answer": numbers[asked], "key": words[asked], "keys": keys, "length": length,
                                 "depth": depth, "sample": sample, "seed": seed})
    return docs


def vartrack_docs(tokenizer, lengths, *, hops: int = 4, chains: int = 1, samples: int = 4,
                  seed: int = 0) -> list[dict]:
    """Variable tracking (RULER's VT): ``VAR A = 12345``, then ``VAR B = VAR A``... spread over the filler.

    The model must list every variable that ends up holding the asked value: it has to follow a chain of
    references scattered over the whole context, which breaks methods that keep only some regions.  ``chains``
    > 1 adds distractor chains with other values.
    """
    docs = []
    for length in lengths:
        for sample in range(samples):
            rng = random.Random(f"vartrack-{seed}-{sample}-{length}")
            names = _variable_names(rng, chains * (hops + 1))
            values = [_number(rng, 5) for _ in range(chains)]
            inserts = []
            for c in range(chains):
                chain = names[c * (hops + 1):(c + 1) * (hops + 1)]
                statements = [f" VAR {chain[0]} = {values[c]}. "]
                statements += [f" VAR {b} = VAR {a}. " for a, b in itertools.pairwise(chain)]
                positions = sorted(rng.random() for _ in statements)  # in order: each refers to an earlier one
                inserts += list(zip(positions, statements))
            asked = names[: hops + 1]
            question = (f"\nQuestion: Find all variables that are assigned the value {values[0]} in the text above. "
                        f"Answer: According to the chain of variable assignments in the text above, {hops + 1} "
                        f"variables are assigned the value {values[0]}, they are:")
            head = "Memorize and track the chain of variable assignments hidden in the following text.\n"
            fixed = head + "".join(t for _, t in inserts) + question
            units = _filler_units(tokenizer, length - GEN_ROOM - 8 * hops, fixed)
            text = head + _insert(units, inserts) + question
            docs.append({"input": text, "answer": " ".join(asked), "variables": asked, "value": values[0], "hops": hops,
                             "chains": chains, "length": length, "depth": None, "sample": sample, "seed": seed})
    return docs


def _variable_names(rng: random.Random, count: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    return names


def ppl_docs(tokenizer, lengths, *, samples: int = 1, seed: int = 0, source: str = "pydoc") -> list[dict]:
    """Chunks of ``length`` tokens of CPython's ``pydoc_data`` text for rolling log-likelihood.

    Chunks of one length never overlap; ``seed`` picks where in the ~250k-token text they start.
    """
    ids = tokenizer(offline_text(source), add_special_tokens=False).input_ids
    docs = []
    for length in lengths:
        if length * samples > len(ids):
            raise ValueError(f"the offline text has {len(ids)} tokens; {samples} chunks of {length} do not fit")
        slots = len(ids) // length
        for sample, slot in enumerate(random.Random(f"ppl-{seed}-{length}").sample(range(slots), samples)):
            text = tokenizer.decode(ids[slot * length:(slot + 1) * length])
            docs.append({"text": text, "length": length, "depth": None, "sample": sample, "seed": seed, "offset": slot * length})
    return docs


def _seed(seed: int, sample: int) -> int:
    # Sample 0 keeps the plain seed, so sample 0 of seed s is bench.quality's passkey example of seed s.
    return seed if sample == 0 else seed * 1000 + sample


# --------------------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------------------
def first_number(text: str) -> str:
    """The first run of digits in a generation ('' when there is none)."""
    match = re.search(r"\d+", text)
    return match.group(0) if match else ""


def fraction_found(generation: str, expected: list[str]) -> float:
    """RULER's string_match_all: the fraction of expected strings present in the generation (case-insensitive)."""
    text = generation.lower()
    return sum(e.lower() in text for e in expected) / len(expected)
