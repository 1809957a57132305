"""lm-eval messages that do not apply to how patchattn drives it, dropped one by one; everything else still shows.

* ``HFLM`` warns "do not launch via accelerate" whenever it is handed a model object -- ``PatchAttnLM`` always
  hands it the model it loaded and patched, in one process, on purpose.
* Each offline ``patchattn_*`` task is told "Custom kwargs can be passed to --metadata": we pass them already.
* ``simple_evaluate`` runs ``git describe`` for the results' ``git_hash`` without capturing git's stderr, so every
  run outside a git checkout printed "fatal: not a git repository".  The same lookup runs here with stderr kept.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess

MODEL_OBJECT_NOTES = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
)
OFFLINE_TASK_NOTE = "Custom kwargs can be passed to `--metadata`"


class _DropMessages(logging.Filter):
    def __init__(self, keep_out):
        super().__init__()
        self.keep_out = keep_out

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.keep_out(record.getMessage())


@contextlib.contextmanager
def dropping(logger_name: str, keep_out):
    """Within the block, the records of ``logger_name`` for which ``keep_out(message)`` is true are not shown."""
    logger = logging.getLogger(logger_name)
    drop = _DropMessages(keep_out)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def model_object_notes():
    return dropping("lm_eval.models.huggingface", lambda message: message.startswith(MODEL_OBJECT_NOTES))


def offline_task_notes():
    return dropping("lm_eval.api.task",
                    lambda message: message.startswith("patchattn_") and OFFLINE_TASK_NOTE in message)


def git_hash_quietly() -> str | None:
    """``git describe --always`` of the working directory, or None outside a checkout (git's stderr captured)."""
    try:
        done = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=True)
    except (subprocess.CalledProcessError, FileNotFoundError):
        from lm_eval.loggers.utils import get_commit_from_path  # lm-eval's fallback: read .git/HEAD if present

        return get_commit_from_path(os.getcwd())
    return done.stdout.strip()


@contextlib.contextmanager
def quiet_git_hash():
    """Within the block, ``simple_evaluate`` records the git hash without git's "not a git repository"."""
    import lm_eval.evaluator  # optional extra: the caller checked it is installed

    previous = lm_eval.evaluator.get_git_commit_hash
    lm_eval.evaluator.get_git_commit_hash = git_hash_quietly
    try:
        yield
    finally:
        lm_eval.evaluator.get_git_commit_hash = previous


@contextlib.contextmanager
def quiet_evaluation():
    with quiet_git_hash(), offline_task_notes():
        yield
