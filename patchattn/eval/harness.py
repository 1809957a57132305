"""``patchattn.eval.evaluate``: lm-eval tasks (ours offline, or any lm-eval task) on a patched model, from Python."""

from __future__ import annotations

import os
import tempfile

from ..lm_eval import require_lm_eval
from ..lm_eval.quiet import quiet_evaluation
from ..tasks import TASKS, task_name, tasks_path

# Task parameters travel to the task generators as lm-eval metadata; everything else goes to simple_evaluate.
TASK_PARAMS = ("lengths", "depths", "samples", "seed", "keys", "hops", "chains")


def make_lm(model_or_name, method: str | None = "dense", *, method_args=None, tokenizer=None, targets="text",
            **model_kwargs):
    """A ``PatchAttnLM`` for an embedded name / local path, or for a model object (``tokenizer`` needed)."""
    require_lm_eval()
    from ..lm_eval.model import PatchAttnLM  # optional: needs the lm-eval extra

    return PatchAttnLM(model_or_name, method=method, method_args=method_args, targets=targets,
                       tokenizer=tokenizer, **model_kwargs)


def task_metadata(lm, model_or_name, params: dict, workdir: str) -> dict:
    """What the offline task generators need: a tokenizer they can load by name and the model's context."""
    meta = {k: v for k, v in params.items() if v is not None}
    if isinstance(model_or_name, str):
        meta["pretrained"] = model_or_name
    else:
        # Metadata must stay plain data (lm-eval copies and logs it): hand the tokenizer over as a folder.
        folder = os.path.join(workdir, "tokenizer")
        lm.tokenizer.save_pretrained(folder)
        meta["tokenizer"] = folder
    meta.setdefault("max_length", lm.max_length)
    return meta


def resolve_tasks(tasks) -> list[str]:
    """Our short names (``passkey``) become ``patchattn_passkey``; any other name is left to lm-eval."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    return [TASKS.get(n.strip(), n.strip()) for n in names if n.strip()]


def evaluate(model_or_name, tasks, method: str | None = "dense", *, method_args=None, tokenizer=None, lm=None,
             limit=None, log_samples: bool = False, **cfg) -> dict:
    """Evaluate a (patched) model on lm-eval tasks; returns lm-eval's results dict plus a ``patchattn`` entry.

    Args:
        model_or_name: ``"smollm2"``, ``"gemma3-270m"``, a local path, or a transformers model object.
        tasks: names or a comma-separated string; ``passkey``, ``needle``, ``vartrack``, ``ppl`` are our offline
            tasks, anything else is looked up among lm-eval's own tasks (those may need network).
        method: method to patch with (``None`` keeps a model object's current patch).
        method_args: config overrides (dict or JSON string).
        tokenizer: needed with a model object.
        lm: an existing ``PatchAttnLM`` to reuse (then model, method and tokenizer arguments are ignored).
        **cfg: task parameters (``lengths``, ``depths``, ``samples``, ``seed``, ``keys``, ``hops``, ``chains``) and
            keyword arguments of ``lm_eval.simple_evaluate`` (``num_fewshot``, ``batch_size``...).

    Example:
        >>> patchattn.eval.evaluate("smollm2", "passkey", method="hip", lengths=[1024, 2048])["results"]
    """
    from lm_eval import simple_evaluate  # optional: the lm-eval extra
    from lm_eval.tasks import TaskManager

    names = resolve_tasks(tasks)
    for name in names:
        if name.startswith("patchattn_"):
            task_name(name)  # a misspelt task of ours fails before any model is loaded
    params = {k: cfg.pop(k) for k in TASK_PARAMS if k in cfg}
    if lm is None:
        lm = make_lm(model_or_name, method, method_args=method_args, tokenizer=tokenizer,
                     **{k: cfg.pop(k) for k in ("device", "dtype", "targets", "max_length") if k in cfg})
    lm.meter.reset()
    with tempfile.TemporaryDirectory(prefix="patchattn-eval-") as workdir:
        meta = task_metadata(lm, model_or_name, params, workdir)
        only_ours = all(n in TASKS.values() for n in names)
        manager = TaskManager(include_path=tasks_path(), include_defaults=not only_ours, metadata=meta)
        _check_known(manager, names)
        with quiet_evaluation():  # lm-eval notes that do not apply here (see patchattn.lm_eval.quiet)
            results = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                                      log_samples=log_samples, **cfg)
    results["patchattn"] = {"method": lm.method_name, "config": lm.method_config, "density": lm.density}
    return results


def _check_known(manager, names: list[str]) -> None:
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        ours = ", ".join(f"{k} ({v})" for k, v in TASKS.items())
        raise ValueError(f"unknown task(s) {unknown}; patchattn's offline tasks: {ours}; other names must be "
                         "lm-eval tasks (lm-eval ls tasks)")
