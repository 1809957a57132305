"""patchattn.data: the offline text, its token ids and the passkey prompts every part of the package shares."""

from __future__ import annotations

import torch

from patchattn import data
from patchattn.eval import longctx, ppl


class WordTokenizer:
    """Whitespace 'tokenizer' (ids = word lengths): enough to check slicing, caching and prompt sizing."""

    calls = 0

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        WordTokenizer.calls += 1
        ids = [len(w) for w in text.split()]

        class Out:
            input_ids = torch.tensor([ids]) if return_tensors == "pt" else ids

        return Out()


def test_text_token_ids_are_a_slice_of_the_whole_text_tokenised_once():
    tok = WordTokenizer()
    whole = tok(data.offline_text(), return_tensors="pt").input_ids
    before = WordTokenizer.calls
    a = data.text_token_ids(tok, 100, offset=50)
    b = data.text_token_ids(tok, 10)
    assert WordTokenizer.calls == before + 1, "the ~1 MB text is tokenised once per tokenizer"
    assert torch.equal(a, whole[:, 50:150]) and torch.equal(b, whole[:, :10])
    other = WordTokenizer()
    data.text_token_ids(other, 10)
    assert WordTokenizer.calls == before + 2, "another tokenizer tokenises again"


def test_text_token_ids_refuse_more_than_the_text_holds():
    tok = WordTokenizer()
    n = data.all_token_ids(tok).shape[1]
    try:
        data.text_token_ids(tok, n, offset=1)
    except ValueError as err:
        assert f"only {n} tokens" in str(err)
    else:
        raise AssertionError("expected ValueError")


def test_passkey_prompt_hides_the_key_at_the_depth():
    tok = WordTokenizer()
    text, key = data.passkey_prompt(tok, 400, 0.5, seed=3)
    assert (text, key) == data.passkey_prompt(tok, 400, 0.5, seed=3)
    assert text.endswith(data.PASSKEY_QUESTION) and text.count(key) == 2
    first = text.index(key) / len(text)
    assert 0.3 < first < 0.7
    example = data.passkey_example(tok, 400, 0.0)
    assert example.answer in data.passkey_prompt(tok, 400, 0.0)[0] and example.depth == 0.0
    assert data.filler_ids(tok, 7) == (tok(data.FILLER).input_ids * 2)[:7]


def test_old_import_paths_still_work():
    assert longctx.passkey_example is data.passkey_example and longctx.FILLER is data.FILLER
    assert ppl.text_token_ids is data.text_token_ids and ppl.offline_text is data.offline_text


def test_the_second_offline_text_is_code_and_differs_from_the_prose():
    from patchattn.data import offline_text

    code, prose = offline_text("stdlib"), offline_text("pydoc")
    assert len(code) > 500_000 and "def " in code and "class " in code
    assert code[:10_000] not in prose


def test_results_are_stamped_with_the_source_commit():
    import re

    from patchattn.report import environment

    env = environment()
    assert env["date"] and env["torch"]
    # In a git checkout (the tests' case) the commit is a 40-hex id, with +dirty when tracked files changed.
    assert env["commit"] is None or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", env["commit"])
