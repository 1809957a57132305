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

from ..data import all_token_ids
from ..models import EMBEDDED, load_pretrained

PLANS_DIR = Path(__file__).parent / "plans"
COMMANDS = {"moa": "patchattn.calibrate.moa", "retrieval-heads": "patchattn.calibrate.retrieval_heads",
            "act": "patchattn.calibrate.act"}
# Config fields that identify a model well enough to pick a shipped artifact automatically.
# Calibrations read the offline text from here on, so they never see the tokens the benchmarks score.
CALIBRATION_TEXT_OFFSET = 32768
SIGNATURE_FIELDS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size", "vocab_size")


# ---- artifacts ---------------------------------------------------------------------------------------------------
def shipped(payload: str) -> list[str]:
    """Names of the shipped artifacts holding ``payload`` (``"rules"`` or ``"scores"``)."""
    names = []
    for path in sorted(PLANS_DIR.glob("*.json")):
        if payload in _read_json(str(path), path.stat().st_mtime_ns):
            names.append(path.stem)
    return names


def resolve(name_or_path: str, payload: str, what: str) -> Path:
    """The file of a shipped artifact name or an existing path; ValueError listing the shipped names otherwise."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        return path
    candidate = PLANS_DIR / f"{name_or_path}.json"
    if os.sep not in name_or_path and candidate.is_file():
        return candidate
    raise ValueError(
        f"no {what} named {name_or_path!r}: not a JSON file and not a shipped {what} "
        f"(shipped: {', '.join(shipped(payload)) or 'none'})"
    )


def load_artifact(name_or_path: str, payload: str, what: str) -> dict:
    """The parsed artifact, checked to be well-formed (shape checks against a model: ``check_against``)."""
    path = resolve(name_or_path, payload, what)
    data = _read_json(str(path), path.stat().st_mtime_ns)
    for key in ("num_layers", "num_heads", payload):
        if key not in data:
            raise ValueError(f"{what} {path} has no {key!r} field (expected keys: model, num_layers, num_heads, "
                             f"{payload}, meta)")
    rows = data[payload]
    layers, heads = data["num_layers"], data["num_heads"]
    if not isinstance(rows, list) or len(rows) != layers or any(not isinstance(r, list) or len(r) != heads for r in rows):
        raise ValueError(f"{what} {path}: {payload!r} must be a [{layers}][{heads}] nested list "
                         f"(num_layers x num_heads)")
    return data


_CACHE: dict = {}


def _read_json(path: str, mtime_ns: int) -> dict:
    """JSON only, cached per (path, modification time) so 30 layers do not parse the same file 30 times."""
    key = (path, mtime_ns)
    if key not in _CACHE:
        with open(path, encoding="utf-8") as handle:
            try:
                data = json.load(handle)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"{path} is not valid JSON ({err}); calibration artifacts are JSON only") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object")
        _CACHE[key] = data
    return _CACHE[key]


def check_against(data: dict, model_config, what: str) -> None:
    """ValueError naming each dimension where the artifact and the model differ."""
    wanted = {"num_layers": model_config.num_hidden_layers, "num_heads": model_config.num_attention_heads}
    differ = [f"{k}: {what} has {data[k]}, model has {v}" for k, v in wanted.items() if data[k] != v]
    if differ:
        raise ValueError(f"{what} for {data.get('model', '?')!r} does not fit this model ({'; '.join(differ)}); "
                         "calibrate one for this model (python -m patchattn.calibrate.moa / .retrieval_heads --help)")


def signature(model_config) -> dict:
    return {f: getattr(model_config, f, None) for f in SIGNATURE_FIELDS}


def shipped_for(model_config, payload: str) -> str | None:
    """The name of a shipped artifact calibrated on exactly this model architecture, if any."""
    wanted = signature(model_config)
    for name in shipped(payload):
        data = _read_json(str(PLANS_DIR / f"{name}.json"), (PLANS_DIR / f"{name}.json").stat().st_mtime_ns)
        if data.get("meta", {}).get("signature") == wanted:
            return name
    return None


def artifact(model_name: str, model_config, payload: str, rows: list, meta: dict) -> dict:
    return {"model": model_name, "num_layers": model_config.num_hidden_layers,
            "num_heads": model_config.num_attention_heads, payload: rows,
            "meta": {**meta, "signature": signature(model_config)}}


def save_json(data: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return path


# ---- calibration helpers shared by the commands ------------------------------------------------------------------
def load_model(name_or_path: str):
    """(model, tokenizer or None): an embedded name (``smollm2``) or a local ``save_pretrained`` folder.

    A folder without tokenizer files (a tiny random test model) gives ``tokenizer=None``; the commands then use
    seeded random token ids instead of text.
    """
    if name_or_path in EMBEDDED or name_or_path.endswith(".gguf"):
        return load_pretrained(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype="float32").eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model, tokenizer


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
