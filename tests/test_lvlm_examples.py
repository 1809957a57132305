"""The LVLM examples (``examples/lvlm_hallucination.py``, ``examples/lvlm_carve.py``) without their downloads: the
POPE / CHAIR scoring against hand-counted cases, the item files, and the whole protocol on a tiny random LLaVA with a
tiny processor (the argument checks run as a user runs them: tests/test_cli_ux.py)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import patchattn
from patchattn.lvlm import CarveConfig
from patchattn.testing import tiny_model

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["yes", "no", "a", "cat", "dog", "on", "the", "couch", "hot", "sofa", "remotes", "not", "there", "is"]


@pytest.fixture(scope="module")
def halluc():
    import sys

    sys.path.insert(0, str(ROOT / "examples"))  # lvlm_carve imports lvlm_hallucination as the script does
    try:
        yield importlib.import_module("lvlm_hallucination")
    finally:
        sys.path.remove(str(ROOT / "examples"))


class TinyProcessor:
    """transformers-style processor for the tiny LLaVA: text to byte ids, ``<image>`` to its 16 image tokens, a PIL
    image resized to 16 x 16; ids decode to words, so answers and captions have yes / no and object names."""

    chat_template = None

    def __init__(self, model):
        self.image_token = model.config.image_token_id
        self.size = model.config.vision_config.image_size
        self.tokens = (self.size // model.config.vision_config.patch_size) ** 2

    def __call__(self, text, images, return_tensors="pt"):
        before, after = text.split("<image>")
        encode = lambda s: [3 + b % 97 for b in s.encode()]
        ids = torch.tensor([encode(before) + [self.image_token] * self.tokens + encode(after)])
        pixels = np.asarray(images.resize((self.size, self.size)), dtype=np.float32) / 255
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "pixel_values": torch.from_numpy(pixels).permute(2, 0, 1)[None]}

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(WORDS[int(i) % len(WORDS)] for i in row) for row in ids]


def test_pope_answers_are_read_as_llava_reads_them(halluc):
    assert halluc.pope_answer("Yes, there is a cat.") == "yes"
    assert halluc.pope_answer("No") == "no" and halluc.pope_answer("There is not a dog. Yes.") == "no"
    assert halluc.pope_answer("Nope, none") == "yes"  # the rule: only the words no / not / No mean no
    assert halluc.pope_answer("I see a cat. No dog.") == "yes"  # only the first sentence is read
    assert not halluc.is_clear("Nope, none") and halluc.is_clear("no,")


def test_pope_metrics_match_a_hand_count(halluc):
    answers = ["Yes", "No", "Yes", "yes", "No.", "maybe"]  # the last reads as yes
    labels = ["yes", "yes", "no", "yes", "no", "no"]
    got = halluc.pope_metrics(answers, labels)
    tp, fp, fn = 2, 2, 1  # yes/yes x2; yes/no: items 3 and 6; no/yes: item 2
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    assert got["accuracy"] == pytest.approx(3 / 6) and got["precision"] == pytest.approx(precision)
    assert got["recall"] == pytest.approx(recall)
    assert got["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert got["yes_ratio"] == pytest.approx(4 / 6) and got["unclear"] == 1 and got["n"] == 6


def test_caption_objects_phrases_plurals_and_synonyms(halluc):
    mentioned = halluc.mentioned_objects
    assert mentioned("A hot dog on a plate next to two dogs.") == {"hot dog", "dog"}
    assert mentioned("A teddy bear.") == {"teddy bear"}  # not 'bear'
    assert mentioned("Two kittens on a sofa with remote controls, and knives.") == {"cat", "couch", "remote", "knife"}
    assert mentioned("A man and two women near the buses.") == {"person", "bus"}
    assert mentioned("Scattered catalogues.") == set()  # whole words only


def test_chair_metrics_match_a_hand_count(halluc):
    captions = ["Two cats on a couch with a dog.", "A cat and a remote.", "Nothing to see."]
    truths = [["cat", "couch", "remote"], ["cat", "remote"], ["person"]]
    got = halluc.chair_metrics(captions, truths)
    assert got["mentioned"] == 5 and got["hallucinated"] == 1  # {cat, couch, dog} + {cat, remote}; dog is wrong
    assert got["chair_i"] == pytest.approx(1 / 5) and got["chair_s"] == pytest.approx(1 / 3)
    assert got["recall"] == pytest.approx(4 / 6)


def test_item_files_are_read_and_checked(halluc, tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    pope = tmp_path / "pope.jsonl"
    pope.write_text(json.dumps({"image": "a.png", "text": "Is there a cat?", "label": "Yes"}) + "\n\n"
                    + json.dumps({"image": "http://x/b.jpg", "object": "stop sign", "label": "no"}) + "\n")
    items = halluc.pope_items(halluc._json_lines(str(pope), "--pope-file"), str(tmp_path))
    assert items == [{"image": str(tmp_path / "a.png"), "question": "Is there a cat?", "label": "yes"},
                     {"image": "http://x/b.jpg", "question": "Is there a stop sign in the image?", "label": "no"}]
    with pytest.raises(ValueError, match=r"no image file .*relative paths: --image-root"):
        halluc.pope_items(halluc._json_lines(str(pope), "--pope-file"))
    bad = tmp_path / "bad.jsonl"
    for line, message in [('{"image": "http://x", "object": "cat", "label": "maybe"}', "'yes' or 'no'"),
                          ('{"image": "http://x", "label": "no"}', "'text'"), ("{oops", r"bad.jsonl:1 is not JSON")]:
        bad.write_text(line + "\n")
        with pytest.raises(ValueError, match=message):
            halluc.pope_items(halluc._json_lines(str(bad), "--pope-file"))
    chair = [("item", {"image": "http://x", "objects": ["Sofa", "cat", "cat"]})]
    assert halluc.chair_items(chair)[0]["objects"] == ["cat", "couch"]
    with pytest.raises(ValueError, match=r"\['unicorn'\] are not COCO object names"):
        halluc.chair_items([("item", {"image": "http://x", "objects": ["unicorn"]})])


def test_method_lists_are_checked(halluc):
    assert halluc.lvlm_methods('var;vhr@a3:{"alpha": 3}') == [("var", "var", {}), ("vhr@a3", "vhr", {"alpha": 3})]
    for text, message in [("varr", "Did you mean 'var'"), ('vhr:{"alpah": 2}', "did you mean 'alpha'"),
                          ("gna", "does not patch vision-language models"), ("vhr,vhr", "distinct"),
                          ("dense", "not 'dense'")]:
        with pytest.raises(ValueError, match=message):
            halluc.lvlm_methods(text)
    assert set(halluc.vision_language_methods()) >= {"var", "vhr", "paint", "composite"}


def test_the_protocol_runs_dense_then_each_method_on_a_tiny_llava(halluc, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(tmp_path / name)
    pope = halluc.pope_items([(f"item {i}", {"image": str(tmp_path / image), "object": obj, "label": label})
                              for i, (image, obj, label) in enumerate([("a.png", "cat", "yes"), ("a.png", "dog", "no"),
                                                                       ("b.png", "couch", "yes")])])
    chair = halluc.chair_items([("c", {"image": str(tmp_path / "a.png"), "objects": ["cat", "couch"]})])
    model = tiny_model("llava")
    methods = halluc.lvlm_methods('dense@again;vhr;paint:{"start_layer": 0};var:{"sink_dims": [0, 1], "tau": 1.0};'
                                  "composite")
    lines = []
    results = halluc.evaluate(model, TinyProcessor(model), methods, pope, chair, answer_tokens=3, caption_tokens=6,
                              log=lines.append)
    assert list(results) == ["dense", "dense@again", "vhr", "paint", "var", "composite"]
    assert patchattn.get_handle(model) is None  # unpatched after each method
    assert results["dense@again"]["answers"] == results["dense"]["answers"]  # patched dense = unpatched, end to end
    assert results["dense@again"]["captions"] == results["dense"]["captions"]
    for label, result in results.items():
        assert len(result["answers"]) == 3 and len(result["captions"]) == 1
        assert result["pope"] == halluc.pope_metrics(result["answers"], ["yes", "no", "yes"])  # scores its own answers
        assert result["chair"] == halluc.chair_metrics(result["captions"], [["cat", "couch"]])
        assert all(len(a.split()) == 3 for a in result["answers"]), label
    assert "paint" in results["paint"]["patch"] and len(lines) == 6
    json.dumps(results)  # the example writes them as JSON


def test_carve_example_prompt_from_a_chat_template(halluc):
    carve_example = importlib.import_module("lvlm_carve")

    class QwenLike:  # renders a chat template with braces and Qwen2-VL's image placeholder
        chat_template = "..."

        def apply_chat_template(self, messages, add_generation_prompt):
            text = messages[0]["content"][1]["text"]
            return f"<|im_start|>system {{json}}<|im_end|><|vision_start|><|image_pad|><|vision_end|>{text}<|im_end|>"

    prompt = carve_example.carve_prompt(QwenLike())
    config = CarveConfig(prompt=prompt)  # the placeholder is accepted
    assert config.prompt.format(instruction="Where?") == \
        "<|im_start|>system {json}<|im_end|><|vision_start|><|image_pad|><|vision_end|>Where?<|im_end|>"
    assert carve_example.carve_config('{"steps": 3}', top_p=0.3, mode=None) == CarveConfig(steps=3, top_p=0.3)
    with pytest.raises(ValueError, match="did you mean 'steps'"):
        carve_example.carve_config('{"stps": 3}')
    with pytest.raises(ValueError, match="image file name"):
        carve_example.image_file("refined.txt")
