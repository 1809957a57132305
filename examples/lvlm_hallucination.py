"""Object hallucination of a real vision-language model, dense and patched with each LVLM method: POPE and CHAIR style.

Needs network access to the Hugging Face Hub (the weights and the images are downloaded) and, for 7B models, a GPU
(LLaVA-1.5-7B: ~15 GB in bf16).  Nothing here runs in this repository's tests beyond the argument checks and the
protocol on a tiny random model; it is written to run unchanged where the weights are reachable:

    python examples/lvlm_hallucination.py                                   # LLaVA-1.5-7B; dense, var, vhr, paint
    python examples/lvlm_hallucination.py --model Qwen/Qwen2-VL-2B-Instruct --methods vhr,paint
    python examples/lvlm_hallucination.py --methods 'var;vhr@a3:{"alpha": 3}' --out runs/halluc.json
    python examples/lvlm_hallucination.py --pope-file coco_pope_adversarial.json --image-root val2014/ --limit 500

POPE (Li et al., EMNLP 2023): yes/no questions "Is there a <object> in the image?" with LLaVA-1.5's answer
instruction, scored as LLaVA's eval_pope.py does (an answer whose first sentence has the word "no"/"not" is no,
anything else yes; ``unclear`` counts the answers with neither word).  Accuracy, precision, recall and F1 of "yes".
CHAIR (Rohrbach et al., EMNLP 2018): the model describes the image; the COCO object names (and a few synonyms) its
caption mentions are compared with the image's objects.  CHAIR_i = hallucinated mentions / mentions, CHAIR_s =
captions with a hallucinated object / captions (lower is better), recall = the image's objects mentioned.

The built-in items are a handful of questions on two public images, a smoke run, not a benchmark: for numbers, give
the POPE files (``--pope-file``, JSON lines ``{"image", "text" or "object", "label"}``, the POPE repository's format)
and COCO captions' objects (``--chair-file``, JSON lines ``{"image", "objects": [...]}``).  Every argument (method
names and fields, files, images on disk, the output folder) is checked before anything is downloaded.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
import time
import urllib.request
from pathlib import Path

import patchattn
from patchattn.api import parse_methods

DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"
DEFAULT_METHODS = "var,vhr,paint"
COCO_CATS = "http://images.cocodataset.org/val2017/000000039769.jpg"  # two cats, two remotes, a couch
STOP_SIGN = "https://www.ilankelman.org/stopsigns/australia.jpg"  # a stop sign on a street (LLaVA's model card)
POPE_ITEMS = [{"image": image, "object": name, "label": label} for image, name, label in (
    (COCO_CATS, "cat", "yes"), (COCO_CATS, "remote", "yes"), (COCO_CATS, "couch", "yes"), (COCO_CATS, "dog", "no"),
    (COCO_CATS, "bicycle", "no"), (STOP_SIGN, "stop sign", "yes"), (STOP_SIGN, "giraffe", "no"),
    (STOP_SIGN, "elephant", "no"),
)]
CHAIR_ITEMS = [{"image": COCO_CATS, "objects": ["cat", "remote", "couch"]}]
POPE_QUESTION = "Is there a {object} in the image?"
POPE_INSTRUCTION = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5's POPE prompt
CAPTION_INSTRUCTION = "Please describe this image in detail."

COCO_OBJECTS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
SYNONYMS = {  # a caption's word -> the COCO name (a short list; CHAIR's own table is longer)
    "man": "person", "men": "person", "woman": "person", "women": "person", "people": "person", "child": "person",
    "children": "person", "boy": "person", "girl": "person", "kid": "person", "bike": "bicycle",
    "motorbike": "motorcycle", "plane": "airplane", "sofa": "couch", "remote control": "remote",
    "television": "tv", "monitor": "tv", "cellphone": "cell phone", "phone": "cell phone", "table": "dining table",
    "plant": "potted plant", "fridge": "refrigerator", "doughnut": "donut", "kitten": "cat", "puppy": "dog",
    "ball": "sports ball", "racket": "tennis racket", "hydrant": "fire hydrant", "computer mouse": "mouse",
}
IRREGULAR = {"knives": "knife", "mice": "mouse"}  # other plurals: the name + s / es


# ---- arguments, checked before any download ----------------------------------------------------------------------
def lvlm_methods(text: str) -> list[tuple[str, str, dict]]:
    """``'var,vhr'`` or ``'var;vhr@a3:{"alpha": 3}'`` -> ``[(label, method, overrides)]``; every name and field
    is checked (a typo fails here, with the closest name), and every method must support LVLMs."""
    try:
        methods = parse_methods(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--methods {text!r}: the overrides after ':' are JSON ({err})") from err
    if not methods:
        raise ValueError("--methods is empty; give e.g. 'var,vhr,paint'")
    supported = sorted(m.name for m in patchattn.list_methods() if "lvlm" in m.families)
    for label, method, overrides in methods:
        patchattn.get_config(method, **overrides)  # unknown name or field: ValueError with the closest match
        if method not in supported:
            raise ValueError(f"{method!r} does not patch vision-language models; those that do: "
                             f"{', '.join(supported)} (made for them: {', '.join(vision_language_methods())})")
    labels = [label for label, _, _ in methods]
    if len(set(labels)) != len(labels) or "dense" in labels:
        raise ValueError(f"--methods labels {labels} must be distinct and not 'dense' (dense always runs first; "
                         "name variants as method@label)")
    return methods


def vision_language_methods() -> list[str]:
    """The methods made for LVLMs (the text methods also run on an LVLM's language backbone)."""
    return [m.name for m in patchattn.list_methods() if tuple(m.families) == ("lvlm",)]


def is_url(reference: str) -> bool:
    return reference.startswith(("http://", "https://"))


def resolve_image(reference, root: str | None, where: str, root_flag: str | None = "--image-root") -> str:
    """An image URL as it is, or a local path (relative to ``root`` when given) that must exist."""
    if not isinstance(reference, str) or not reference:
        raise ValueError(f"{where}: 'image' must be a URL or a file path, got {reference!r}")
    if is_url(reference):
        return reference
    path = Path(root) / reference if root and not Path(reference).is_absolute() else Path(reference)
    if not path.is_file():
        hint = f" (relative paths: {root_flag})" if root_flag and not root else ""
        raise ValueError(f"{where}: no image file {str(path)!r}{hint}")
    return str(path)


def _json_lines(path: str, flag: str):
    """(where, record) of each non-empty line of a JSON-lines file (a whole-file JSON list works too)."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{flag}: no file {path!r}")
    text = file.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            out = [(f"{path} item {i}", r) for i, r in enumerate(json.loads(text))]
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not JSON ({err})") from err
    else:
        out = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append((f"{path}:{number}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number} is not JSON ({err})") from err
    if not out:
        raise ValueError(f"{flag}: {path!r} has no items")
    return out


def pope_items(records, root: str | None = None) -> list[dict]:
    """``[{image, question, label}]`` from POPE records: ``text`` (the question) or ``object``; label yes/no."""
    items = []
    for where, record in records:
        if not isinstance(record, dict):
            raise TypeError(f"{where}: a POPE item is an object {{image, text or object, label}}, got {record!r}")
        label = str(record.get("label", record.get("answer", ""))).strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"{where}: 'label' must be 'yes' or 'no', got {record.get('label')!r}")
        question = record.get("text") or record.get("question")
        if not question:
            if not record.get("object"):
                raise ValueError(f"{where}: a POPE item needs 'text' (the question) or 'object'")
            question = POPE_QUESTION.format(object=record["object"])
        items.append({"image": resolve_image(record.get("image"), root, where), "question": question, "label": label})
    return items


def chair_items(records, root: str | None = None) -> list[dict]:
    """``[{image, objects}]``: the image's objects as COCO names (synonyms mapped); unknown names are refused."""
    items = []
    for where, record in records:
        objects = record.get("objects") if isinstance(record, dict) else None
        if not isinstance(objects, list) or not all(isinstance(o, str) for o in objects):
            raise ValueError(f"{where}: a CHAIR item is {{image, objects: [COCO names]}}, got {record!r}")
        names = [SYNONYMS.get(o.lower().strip(), o.lower().strip()) for o in objects]
        unknown = sorted(set(names) - set(COCO_OBJECTS))
        if unknown:
            raise ValueError(f"{where}: objects {unknown} are not COCO object names; known: {', '.join(COCO_OBJECTS)}")
        items.append({"image": resolve_image(record.get("image"), root, where), "objects": sorted(set(names))})
    return items


def writable_file(path: str, flag: str) -> str:
    if not Path(path).parent.is_dir():
        raise ValueError(f"{flag} {path!r}: the folder {str(Path(path).parent)!r} does not exist")
    return path


# ---- scoring -----------------------------------------------------------------------------------------------------
def pope_answer(text: str) -> str:
    """'yes' or 'no' as LLaVA's eval_pope.py reads an answer: the first sentence, commas dropped, has the word 'no'
    or 'not' (or 'No') -> no; anything else -> yes."""
    first = text.split(".")[0].replace(",", "")
    words = first.split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


def is_clear(text: str) -> bool:
    """Whether the answer says yes or no at all (the POPE rule reads every other answer as yes)."""
    return bool(re.search(r"\b(yes|no|not)\b", text.lower()))


def pope_metrics(answers: list[str], labels: list[str]) -> dict:
    """Accuracy, precision / recall / F1 of 'yes', the share of 'yes' answers, and the unclear answers."""
    said = [pope_answer(a) for a in answers]
    tp = sum(s == "yes" and t == "yes" for s, t in zip(said, labels))
    fp = sum(s == "yes" and t == "no" for s, t in zip(said, labels))
    fn = sum(s == "no" and t == "yes" for s, t in zip(said, labels))
    correct = sum(s == t for s, t in zip(said, labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(labels)
    return {"n": n, "accuracy": correct / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": said.count("yes") / n if n else 0.0, "unclear": sum(not is_clear(a) for a in answers)}


def _phrases():
    """(phrase, COCO name), longest first, so 'hot dog' is read before 'dog' and 'teddy bear' before 'bear'."""
    pairs = [(name, name) for name in COCO_OBJECTS] + list(SYNONYMS.items())
    return sorted(pairs, key=lambda pair: -len(pair[0]))


def mentioned_objects(caption: str) -> set[str]:
    """The COCO objects a caption names (whole words, simple plurals, the synonyms above)."""
    text = " " + re.sub(r"[^a-z ]", " ", caption.lower()) + " "
    for plural, singular in IRREGULAR.items():
        text = text.replace(f" {plural} ", f" {singular} ")
    found = set()
    for phrase, name in _phrases():
        pattern = re.compile(rf" {re.escape(phrase)}(?:s|es)? ")
        if pattern.search(text):
            found.add(name)
            text = pattern.sub(" # ", text)  # a matched phrase is not read again as a shorter one
    return found


def chair_metrics(captions: list[str], truths: list[list[str]]) -> dict:
    """CHAIR_i (hallucinated / mentioned objects), CHAIR_s (captions with a hallucination), recall of the truths."""
    mentioned = hallucinated = covered = total_truth = bad_captions = 0
    for caption, truth in zip(captions, truths):
        found, real = mentioned_objects(caption), set(truth)
        wrong = found - real
        mentioned += len(found)
        hallucinated += len(wrong)
        covered += len(found & real)
        total_truth += len(real)
        bad_captions += bool(wrong)
    n = len(captions)
    return {"n": n, "chair_i": hallucinated / mentioned if mentioned else 0.0,
            "chair_s": bad_captions / n if n else 0.0, "recall": covered / total_truth if total_truth else 0.0,
            "mentioned": mentioned, "hallucinated": hallucinated}


# ---- the model ----------------------------------------------------------------------------------------------------
def check_family(model_id: str, methods) -> None:
    """From the model's config alone (a small file, before the weights): a supported LVLM family, and one that
    every requested method maps (paint reads the vision tower of LLaVA, Qwen2-VL and Gemma 3 only)."""
    from transformers import AutoConfig

    from patchattn.adapters.families import HF_FAMILIES
    from patchattn.methods.paint import TOKEN_MAPS

    model_type = AutoConfig.from_pretrained(model_id).model_type
    lvlms = sorted(name for name, family in HF_FAMILIES.items() if family.kind == "lvlm")
    if model_type not in lvlms:
        raise ValueError(f"{model_id} is a {model_type!r} model; patchattn's vision-language families: {lvlms}")
    if any(method == "paint" for _, method, _ in methods) and model_type not in TOKEN_MAPS:
        raise ValueError(f"paint supports {sorted(TOKEN_MAPS)}, not {model_type!r} ({model_id}); drop it from "
                         "--methods")


def load_lvlm(model_id: str, device: str | None, dtype: str | None):
    """(model, processor) from the Hub; bf16 on a GPU, fp32 on the CPU unless ``dtype`` says otherwise."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    processor = AutoProcessor.from_pretrained(model_id)
    model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=torch_dtype).to(device).eval()
    return model, processor


def open_image(reference: str, cache: dict):
    """A PIL image (RGB) from a URL or a path, each read once."""
    if reference not in cache:
        from PIL import Image

        if is_url(reference):
            request = urllib.request.Request(reference, headers={"User-Agent": "patchattn-example"})
            with urllib.request.urlopen(request, timeout=60) as response:
                cache[reference] = Image.open(io.BytesIO(response.read())).convert("RGB")
        else:
            cache[reference] = Image.open(reference).convert("RGB")
    return cache[reference]


def chat_prompt(processor, instruction: str) -> str:
    """One image then ``instruction`` in the model's chat template (LLaVA-1.5's template without one)."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return f"USER: <image>\n{instruction} ASSISTANT:"


def on_model(inputs, model) -> dict:
    """The processor's tensors on the model's device; floating ones (pixels) in the model's dtype."""
    import torch

    out = {}
    for name, value in dict(inputs).items():
        if torch.is_tensor(value):
            value = value.to(model.device, dtype=model.dtype) if value.is_floating_point() else value.to(model.device)
        out[name] = value
    return out


def answer(model, processor, image, instruction: str, tokens: int, prompt: str | None = None) -> str:
    """Greedy answer of the model to one image and instruction (in the chat template, or in ``prompt``, a format
    string with ``{instruction}``)."""
    import torch

    text = prompt.format(instruction=instruction) if prompt else chat_prompt(processor, instruction)
    inputs = on_model(processor(text=text, images=image, return_tensors="pt"), model)
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
    return processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()


def run_protocol(model, processor, pope: list[dict], chair: list[dict], images: dict, answer_tokens: int,
                 caption_tokens: int) -> dict:
    """POPE answers and CHAIR captions of the model as it is now (dense or patched), with their scores."""
    start = time.perf_counter()
    answers = [answer(model, processor, open_image(item["image"], images), item["question"] + POPE_INSTRUCTION,
                      answer_tokens) for item in pope]
    captions = [answer(model, processor, open_image(item["image"], images), CAPTION_INSTRUCTION, caption_tokens)
                for item in chair]
    return {"pope": pope_metrics(answers, [item["label"] for item in pope]),
            "chair": chair_metrics(captions, [item["objects"] for item in chair]),
            "seconds": time.perf_counter() - start, "answers": answers, "captions": captions}


def evaluate(model, processor, methods, pope, chair, *, answer_tokens: int = 8, caption_tokens: int = 128,
             log=print) -> dict:
    """``{"dense": ..., label: ...}``: the protocol on the unpatched model, then patched with each method (unpatched
    again after each, also when one fails)."""
    images: dict = {}
    results = {"dense": run_protocol(model, processor, pope, chair, images, answer_tokens, caption_tokens)}
    log(row("dense", results["dense"]))
    for label, method, overrides in methods:
        handle = patchattn.patch(model, method, **overrides)
        try:
            results[label] = run_protocol(model, processor, pope, chair, images, answer_tokens, caption_tokens)
            results[label]["patch"] = handle.summary()
        finally:
            patchattn.unpatch(model)
        log(row(label, results[label]))
    return results


HEADER = (f"{'method':<14} {'POPE acc':>8} {'F1':>6} {'yes':>6} {'unclear':>7} {'CHAIR_i':>8} {'CHAIR_s':>8} "
          f"{'recall':>7} {'s':>7}")


def row(label: str, result: dict) -> str:
    pope, chair = result["pope"], result["chair"]
    return (f"{label:<14} {pope['accuracy']:>8.3f} {pope['f1']:>6.3f} {pope['yes_ratio']:>6.2f} "
            f"{pope['unclear']:>7d} {chair['chair_i']:>8.3f} {chair['chair_s']:>8.3f} {chair['recall']:>7.3f} "
            f"{result['seconds']:>7.1f}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"Hub id of the LVLM (default {DEFAULT_MODEL}; e.g. "
                   "Qwen/Qwen2-VL-2B-Instruct, google/gemma-3-4b-it)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="methods compared with dense: the LVLM ones ("
                   f"{', '.join(vision_language_methods())}) or any text method; 'a;b@x:{{\"field\": value}}' "
                   "gives overrides (default %(default)s)")
    p.add_argument("--pope-file", help="POPE questions, JSON lines {image, text or object, label: yes|no} "
                   "(default: the 8 built-in questions)")
    p.add_argument("--chair-file", help="images to caption, JSON lines {image, objects: [COCO names]} "
                   "(default: one built-in image)")
    p.add_argument("--image-root", help="folder of the files' relative image paths (e.g. COCO val2014/)")
    p.add_argument("--limit", type=int, default=None, help="at most this many items of each file")
    p.add_argument("--answer-tokens", type=int, default=8)
    p.add_argument("--caption-tokens", type=int, default=128)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None)
    p.add_argument("--out", default="lvlm_hallucination.json", help="results as JSON (default %(default)s)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:  # everything the user typed is checked here, before any download
        methods = lvlm_methods(args.methods)
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        if min(args.answer_tokens, args.caption_tokens) < 1:
            raise ValueError("--answer-tokens and --caption-tokens must be >= 1")
        pope = pope_items(_json_lines(args.pope_file, "--pope-file"), args.image_root) if args.pope_file else \
            pope_items([(f"built-in item {i}", item) for i, item in enumerate(POPE_ITEMS)])
        chair = chair_items(_json_lines(args.chair_file, "--chair-file"), args.image_root) if args.chair_file else \
            chair_items([(f"built-in item {i}", item) for i, item in enumerate(CHAIR_ITEMS)])
        pope, chair = pope[:args.limit], chair[:args.limit]
        writable_file(args.out, "--out")
    except (ValueError, TypeError) as err:
        sys.exit(f"error: {err}")

    check_family(args.model, methods)
    model, processor = load_lvlm(args.model, args.device, args.dtype)
    print(f"{args.model}: {len(pope)} POPE questions, {len(chair)} captions")
    print(HEADER)
    results = evaluate(model, processor, methods, pope, chair, answer_tokens=args.answer_tokens,
                       caption_tokens=args.caption_tokens)
    Path(args.out).write_text(json.dumps({"model": args.model, "methods": args.methods, "results": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
