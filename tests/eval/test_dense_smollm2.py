"""Dense SmolLM2-135M-Instruct scores what each task file says, at 1k tokens (slow: real weights on CPU).

Every task YAML carries a line ``# DENSE_SMOLLM2 (1k): metric=value ...`` measured with the same call as here; a
change of the generators, the scoring or the lm-eval glue that moves a score makes this test fail.
"""

import os
import re

import pytest

from patchattn.tasks import TASKS, tasks_path

pytestmark = pytest.mark.slow


def documented_scores(task: str) -> dict[str, float]:
    with open(os.path.join(tasks_path(), f"{TASKS[task]}.yaml"), encoding="utf-8") as handle:
        line = next(line for line in handle if line.startswith("# DENSE_SMOLLM2 (1k):"))
    return {k: float(v) for k, v in re.findall(r"(\w+)=([0-9.]+)", line)}


@pytest.fixture(scope="module")
def dense_smollm2():
    pytest.importorskip("lm_eval")
    from patchattn.eval.harness import make_lm

    try:
        return make_lm("smollm2", "dense", device="cpu")
    except ImportError as err:
        pytest.skip(str(err))


@pytest.mark.parametrize("task", list(TASKS))
def test_dense_smollm2_scores_what_the_task_file_says(dense_smollm2, task):
    from patchattn.eval import evaluate

    documented = documented_scores(task)
    assert documented, f"{task}: no DENSE_SMOLLM2 line in the task file"
    results = evaluate("smollm2", task, lm=dense_smollm2, lengths=[1024])["results"][TASKS[task]]
    for metric, value in documented.items():
        assert results[f"{metric},none"] == pytest.approx(value, rel=1e-3, abs=5e-3), metric
