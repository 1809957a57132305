"""Offline calibrations that produce per-head artifacts (MoA plans, retrieval-head scores), and their loading.

Artifacts are plain JSON (never pickle, never executed): ``{"model", "num_layers", "num_heads", <payload>, "meta"}``
where the payload (``rules`` or ``scores``) is a ``[num_layers][num_heads]`` nested list.  Shipped artifacts live in
``plans/`` and load by name (``plan="smollm2"``); anything else is a path.  The commands are ``python -m patchattn.calibrate.moa ...`` and
``python -m patchattn.calibrate.retrieval_heads ...`` (``main(["moa", ...])`` here dispatches to either).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
from pathlib import Path

import torch
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

# The readers are re-exported here for the calibration commands and existing imports.
from ..artifacts import (  # noqa: F401
    PLANS_DIR,
    SIGNATURE_FIELDS,
    check_against,
    check_finite,
    load_artifact,
    resolve,
    shipped,
    shipped_for,
    signature,
)
from ..data import all_token_ids
from ..models import EMBEDDED, check_model_path, load_pretrained

COMMANDS = {"moa": "patchattn.calibrate.moa", "retrieval-heads": "patchattn.calibrate.retrieval_heads",
            "act": "patchattn.calibrate.act", "headhunter": "patchattn.calibrate.headhunter",
            "sink-dims": "patchattn.calibrate.sink_dims"}
# Calibrations read the offline text from here on, so they never see the tokens the benchmarks score.
CALIBRATION_TEXT_OFFSET = 32768


# ---- artifacts (the readers live in patchattn.artifacts, below the methods that read them) ----------------------
def artifact(model_name: str, model_config, payload: str, rows: list, meta: dict) -> dict:
    return {"model": model_name, "num_layers": model_config.num_hidden_layers,
            "num_heads": model_config.num_attention_heads, payload: rows,
            "meta": {**meta, "signature": signature(model_config)}}


def save_json(data: dict, path) -> Path:
    """Write an artifact; ValueError (before writing) when it holds NaN or Infinity: a calibration that produced
    them went wrong, and the methods would refuse the file anyway."""
    check_finite(data, f"calibration result for {path}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return path


# ---- calibration helpers shared by the commands ------------------------------------------------------------------
def load_model(name_or_path: str):
    """(model, tokenizer or None): an embedded name (``smollm2``) or a local ``save_pretrained`` folder.

    A folder without tokenizer files (a tiny random test model) gives ``tokenizer=None``; the commands then use
    seeded random token ids instead of text.
    """
    check_model_path(name_or_path)  # a missing folder: a clear FileNotFoundError, not a hub repo-id error
    if name_or_path in EMBEDDED or name_or_path.endswith(".gguf"):
        return load_pretrained(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype="float32").eval()
    return model, optional_tokenizer(name_or_path)


def optional_tokenizer(name_or_path: str):
    """The folder's tokenizer, or None for a folder without tokenizer files (a tiny random test model)."""
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError, TypeError):
        return None


def base_parser(prog: str, description: str, default_out: str):
    """The options every calibration command has: ``--model``, ``--out``, ``--seed``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--model", default="smollm2", help="'smollm2' (embedded) or a local save_pretrained folder")
    parser.add_argument("--out", default=default_out, help=f"output JSON (default {default_out})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (default 0)")
    parser.add_argument("--device", default="cpu", help="where to run the model (cpu, cuda; default cpu)")
    parser.add_argument("--text-offset", type=int, default=CALIBRATION_TEXT_OFFSET,
                        help=f"first token of the offline text used (default {CALIBRATION_TEXT_OFFSET}: past the "
                        "first 8k tokens the quality benchmarks evaluate on)")
    return parser


def context_ids(tokenizer, vocab_size: int, n_tokens: int, offset: int, seed: int):
    """``[1, n]`` background tokens: offline text (pydoc) with a tokenizer, else seeded random ids (test models)."""
    if tokenizer is not None:
        ids = _text_ids(tokenizer)
        if ids.shape[1] < offset + n_tokens:
            raise ValueError(f"the offline text has {ids.shape[1]} tokens; asked for {n_tokens} from {offset}")
        return ids[:, offset : offset + n_tokens]
    gen = torch.Generator().manual_seed(seed * 7919 + offset)
    return torch.randint(3, vocab_size, (1, n_tokens), generator=gen)


def _text_ids(tokenizer):
    """The whole pydoc text tokenised once per tokenizer."""
    return all_token_ids(tokenizer)


def model_name(name_or_path: str) -> str:
    return Path(name_or_path).name if os.sep in name_or_path else name_or_path


@contextlib.contextmanager
def attention_probe(model, name: str, fn):
    """Run ``model`` with ``fn`` (transformers' attention signature) as its attention, then restore it.

    Registered under transformers' own registries (not patchattn's method list): it is a measuring tool.
    """
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)
    configs = [model.config, *(getattr(model.config, k) for k in getattr(model.config, "sub_configs", {}) or {})]
    configs = [c for c in configs if hasattr(c, "_attn_implementation_internal")]
    previous = [c._attn_implementation_internal for c in configs]
    for c in configs:
        c._attn_implementation_internal = name
    try:
        yield
    finally:
        for c, impl in zip(configs, previous):
            c._attn_implementation_internal = impl


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``[command, *args]`` with command ``moa`` or ``retrieval-heads`` (for a ``patchattn calibrate`` CLI)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: patchattn calibrate {{{','.join(COMMANDS)}}} [--help]", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
