"""``python -m patchattn.lm_eval <lm-eval's own arguments>``: lm-eval's command line with the ``patchattn`` model and
the offline ``patchattn_*`` tasks registered.

lm-eval 0.4.13 discovers third-party models only through its own registry at import and task folders only through
``--include_path`` (one folder); this front end registers the model, adds our task folder to every task manager
the command creates (beside any ``--include_path`` of yours), and hands every argument to lm-eval unchanged.
"""

from __future__ import annotations

import sys

from ..tasks import tasks_path
from . import require_lm_eval


def install() -> None:
    """Register the ``patchattn`` model and make every TaskManager also index our task folder."""
    require_lm_eval()
    # lm-eval is the optional eval extra: imported once require_lm_eval has said how to install it.
    import lm_eval.tasks

    from . import model  # noqa: F401  (registers "patchattn"; imports lm-eval)

    base = lm_eval.tasks.TaskManager
    if getattr(base, "_patchattn", False):
        return

    class TaskManagerWithOfflineTasks(base):
        _patchattn = True

        def __init__(self, *args, include_path=None, **kwargs):
            paths = [] if include_path is None else list(include_path) if isinstance(include_path, (list, tuple)) \
                else [include_path]
            super().__init__(*args, include_path=[*paths, tasks_path()], **kwargs)

    lm_eval.tasks.TaskManager = TaskManagerWithOfflineTasks
    import lm_eval.evaluator  # optional extra, as above

    lm_eval.evaluator.TaskManager = TaskManagerWithOfflineTasks


def main(argv: list[str] | None = None) -> int:
    try:
        install()
    except ImportError as err:
        print(f"patchattn: {err}", file=sys.stderr)
        return 2
    from lm_eval.__main__ import cli_evaluate  # optional extra, as above

    from .quiet import quiet_evaluation

    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    with quiet_evaluation():
        cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
