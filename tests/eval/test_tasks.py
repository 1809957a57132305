"""The offline tasks: deterministic from a seed, sized to the token budget, needles where the depth says, scored
as documented, capped at the model's context."""

import os

import pytest

from patchattn.tasks import TASKS, task_name, tasks_path
from patchattn.tasks import generators as gen
from patchattn.tasks import utils as task_utils


def _all_docs(tokenizer, seed):
    return {
        "passkey": gen.passkey_docs(tokenizer, [256, 512], [0.0, 0.5, 1.0], samples=2, seed=seed),
        "needle": gen.needle_docs(tokenizer, [512], [0.0, 1.0], seed=seed),
        "vartrack": gen.vartrack_docs(tokenizer, [512], samples=2, seed=seed),
        "ppl": gen.ppl_docs(tokenizer, [256], samples=2, seed=seed),
    }


def test_generation_is_deterministic_and_seeded(smollm2_tokenizer):
    first, again, other = (_all_docs(smollm2_tokenizer, s) for s in (0, 0, 1))
    assert first == again
    for task in first:
        assert first[task] != other[task], f"{task}: the seed changes nothing"
    keys = [d["answer"] for d in first["passkey"]]
    assert len(set(keys)) == len(keys), "every passkey example must have its own key"


@pytest.mark.parametrize("task", ["passkey", "needle", "vartrack"])
def test_prompts_fit_the_length_with_room_to_answer(smollm2_tokenizer, task):
    docs = _all_docs(smollm2_tokenizer, 0)[task]
    slack = gen.GEN_ROOM + 32 + 2 * gen.n_tokens(smollm2_tokenizer, gen.FILLER)  # room to answer + filler granularity
    for doc in docs:
        used = gen.n_tokens(smollm2_tokenizer, doc["input"])
        assert doc["length"] - slack <= used <= doc["length"] - 16, (task, doc["length"], used)


def test_needles_sit_at_their_depth(smollm2_tokenizer):
    for doc in gen.passkey_docs(smollm2_tokenizer, [1024], [0.0, 0.5, 1.0]):
        position = doc["input"].index(f"The pass key is {doc['answer']}") / len(doc["input"])
        assert abs(position - doc["depth"]) < 0.1, (doc["depth"], position)
    for doc in gen.needle_docs(smollm2_tokenizer, [1024], [0.0, 1.0], keys=4):
        needle = f"magic numbers for {doc['key']} is: {doc['answer']}"
        assert doc["input"].count(needle) == 1
        assert doc["input"].count("One of the special magic numbers") == 4
        assert abs(doc["input"].index(needle) / len(doc["input"]) - doc["depth"]) < 0.15


def test_variable_chain_is_in_order_and_complete(smollm2_tokenizer):
    for doc in gen.vartrack_docs(smollm2_tokenizer, [1024], hops=4, samples=3):
        first, *rest = doc["variables"]
        positions = [doc["input"].index(f"VAR {first} = {doc['value']}.")]
        positions += [doc["input"].index(f"VAR {b} = VAR {a}.") for a, b in zip(doc["variables"], rest)]
        assert positions == sorted(positions), "each assignment must come after the one it refers to"
        assert len(doc["variables"]) == 5


def test_ppl_chunks_are_real_text_of_the_asked_length(smollm2_tokenizer):
    docs = gen.ppl_docs(smollm2_tokenizer, [512], samples=3)
    assert len({d["offset"] for d in docs}) == 3
    for doc in docs:
        assert abs(gen.n_tokens(smollm2_tokenizer, doc["text"]) - 512) <= 8
        assert doc["text"].strip()


def test_lengths_are_capped_at_the_context():
    assert gen.cap_lengths([1024, 8192, 32768, 2048], 8192) == [1024, 2048, 8192]
    assert gen.cap_lengths([4096], None) == [4096]
    with pytest.raises(ValueError, match="exceeds the model's context of 512"):
        gen.cap_lengths([1024], 512)
    with pytest.raises(ValueError, match="depths must be fractions"):
        gen.check_depths([0.5, 50])


def test_task_dataset_reads_lm_eval_metadata(tiny_model_dir):
    data = task_utils.passkey_dataset(pretrained=tiny_model_dir, lengths="256,4096", depths=[0.0, 1.0], seed=3)
    rows = data["test"]
    assert sorted(set(rows["length"])) == [256], "4096 exceeds the tiny model's 1024-token context"
    assert rows["depth"] == [0.0, 1.0]
    with pytest.raises(ValueError, match="pretrained=<smollm2"):
        task_utils.passkey_dataset(lengths=[256])


def test_scoring():
    doc = {"answer": "12345", "length": 1024, "variables": ["ABCDE", "FGHIJ"]}
    assert task_utils.score_number(doc, [" 12345. Remember"]) == {"acc": 1.0, "acc_1024": 1.0}
    assert task_utils.score_number(doc, [" 1234 5"])["acc"] == 0.0
    assert task_utils.score_number(doc, ["no number"])["acc"] == 0.0
    assert task_utils.score_variables(doc, [" abcde and XYZ"])["acc_1024"] == 0.5


def test_task_names_and_folder():
    assert task_name("passkey") == "patchattn_passkey" and task_name("patchattn_ppl") == "patchattn_ppl"
    with pytest.raises(ValueError, match="known tasks: passkey"):
        task_name("paskey")
    for full in TASKS.values():
        assert os.path.exists(os.path.join(tasks_path(), f"{full}.yaml"))
