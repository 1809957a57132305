"""Readers of the per-head calibration artifacts (MoA plans, retrieval-head scores, ACT head lists, head gains).

Artifacts are plain JSON (never pickle, never executed): ``{"model", "num_layers", "num_heads", <payload>, "meta"}``
where the payload (``rules``, ``scores``, ...) is a ``[num_layers][num_heads]`` nested list.  Shipped artifacts live in
``patchattn/calibrate/plans/`` and load by name (``plan="smollm2"``); anything else is a path.  The methods read them
from here; ``patchattn.calibrate`` (which runs models through the methods) writes them.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

PLANS_DIR = Path(__file__).parent / "calibrate" / "plans"
# Config fields that identify a model well enough to pick a shipped artifact automatically.
SIGNATURE_FIELDS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size", "vocab_size")


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
    """The parsed artifact, checked to be well-formed (shape checks against a model: ``check_against``).

    Well-formed: positive integer ``num_layers`` / ``num_heads``, a ``[num_layers][num_heads]`` payload and no
    NaN or infinite number in it (Python's JSON reader accepts ``NaN`` and ``Infinity``; no calibration means them).
    """
    path = resolve(name_or_path, payload, what)
    data = _read_json(str(path), path.stat().st_mtime_ns)
    for key in ("num_layers", "num_heads", payload):
        if key not in data:
            raise ValueError(f"{what} {path} has no {key!r} field (expected keys: model, num_layers, num_heads, "
                             f"{payload}, meta)")
    for key in ("num_layers", "num_heads"):
        if isinstance(data[key], bool) or not isinstance(data[key], int) or data[key] < 1:
            raise ValueError(f"{what} {path}: {key!r} must be a positive integer, got {data[key]!r}")
    rows = data[payload]
    layers, heads = data["num_layers"], data["num_heads"]
    if not isinstance(rows, list) or len(rows) != layers or any(not isinstance(r, list) or len(r) != heads for r in rows):
        raise ValueError(f"{what} {path}: {payload!r} must be a [{layers}][{heads}] nested list "
                         f"(num_layers x num_heads)")
    check_finite(rows, f"{what} {path}: {payload}")
    return data


def check_finite(value, where: str) -> None:
    """ValueError naming the first NaN or infinite number in nested lists / dicts (``where[layer][head]``)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} is {value!r}; allowed: finite numbers only (no NaN or Infinity)")
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_finite(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            check_finite(item, f"{where}[{key!r}]")


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
