"""CARVE on a real vision-language model: find what a question is about from the model's own attention, keep those
regions of the image, and ask again on the refined image.

Needs network access to the Hugging Face Hub (the weights are downloaded) and, for 7B models, a GPU (LLaVA-1.5-7B:
~15 GB in bf16).  Nothing here runs in this repository's tests beyond the argument checks and the pipeline on a tiny
random model; it is written to run unchanged where the weights are reachable:

    python examples/lvlm_carve.py --image photo.jpg --question "What is written on the small sign?"
    python examples/lvlm_carve.py --image http://images.cocodataset.org/val2017/000000039769.jpg \\
        --question "What is the cat on the left lying on?" --mode crop --out refined.png
    python examples/lvlm_carve.py --model Qwen/Qwen2-VL-2B-Instruct --image photo.jpg --question "..." \\
        --config '{"steps": 12, "top_p": 0.3}' --method var

It prints the model's answer on the original image, then CARVE's answer on the refined one, and saves the refined
image (``--out``).  ``--config`` sets ``patchattn.lvlm.CarveConfig`` fields (layers, steps, lam, top_p, regions, mode,
...); ``--method`` patches the model (e.g. ``var``) for both answers (CARVE's two attention-reading passes switch the
text backbone to eager attention, so they read the unpatched model's maps).  One image per prompt; its tokens form
one grid on every LVLM family (Idefics3 / SmolVLM with image splitting: the global image's grid).  Every argument is
checked before anything is downloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from lvlm_hallucination import (
    DEFAULT_MODEL,
    answer,
    chat_prompt,
    check_family,
    load_lvlm,
    lvlm_methods,
    open_image,
    resolve_image,
    vision_language_methods,
)

import patchattn
from patchattn.config import closest
from patchattn.lvlm import CarveConfig, carve

SLOT = "INSTRUCTION_SLOT_3141"  # stands for the instruction while the chat template is rendered


def carve_config(text: str, **settings) -> CarveConfig:
    """``CarveConfig`` from ``--config`` JSON and the flags; unknown fields name the closest one."""
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--config {text!r} is not JSON ({err})") from err
    if not isinstance(fields, dict):
        raise TypeError(f"--config must be a JSON object of CarveConfig fields, got {text!r}")
    known = [f.name for f in dataclasses.fields(CarveConfig)]
    for name in fields:
        if name not in known:
            hint = closest(name, known)
            raise ValueError(f"CarveConfig has no field {name!r}" + (f"; did you mean {hint!r}?" if hint else "")
                             + f" Valid fields: {', '.join(known)}")
    fields.update({name: value for name, value in settings.items() if value is not None})
    return CarveConfig(**fields)


def carve_prompt(processor) -> str:
    """The model's chat template around one image and ``{instruction}`` (CARVE's ``prompt`` format string)."""
    text = chat_prompt(processor, SLOT)
    return text.replace("{", "{{").replace("}", "}}").replace(SLOT, "{instruction}")


def image_file(path: str) -> str:
    """``--out``: a file name PIL can write (by its extension) in a folder that exists."""
    from PIL import Image

    extensions = Image.registered_extensions()
    target = Path(path)
    if target.suffix.lower() not in extensions:
        common = ", ".join(e for e in (".png", ".jpg", ".jpeg", ".webp", ".bmp") if e in extensions)
        raise ValueError(f"--out {path!r}: give an image file name ({common}, ...)")
    if not target.parent.is_dir():
        raise ValueError(f"--out {path!r}: the folder {str(target.parent)!r} does not exist")
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"Hub id of the LVLM (default {DEFAULT_MODEL})")
    p.add_argument("--image", required=True, help="image file or URL")
    p.add_argument("--question", required=True)
    p.add_argument("--out", default="carve_refined.png", help="the refined image (default %(default)s)")
    p.add_argument("--mode", choices=("mask", "crop"), default=None, help="mask out the rest (default) or crop")
    p.add_argument("--top-p", type=float, default=None, help="share of the image's token cells kept (paper: 0.4)")
    p.add_argument("--regions", type=int, default=None, help="connected regions kept (paper: 2)")
    p.add_argument("--config", default="{}", help="CarveConfig fields as JSON, e.g. '{\"steps\": 12}'")
    p.add_argument("--method", default=None, help="patch the model for both answers with this method: an LVLM one ("
                   f"{', '.join(vision_language_methods())}) or a text method; 'name:{{\"field\": value}}' gives "
                   "overrides")
    p.add_argument("--answer-tokens", type=int, default=None, help="tokens of each answer (default 32)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:  # everything the user typed is checked here, before any download
        config = carve_config(args.config, mode=args.mode, top_p=args.top_p, regions=args.regions,
                              answer_tokens=args.answer_tokens)
        methods = lvlm_methods(args.method) if args.method else [None]
        if len(methods) != 1:
            raise ValueError(f"--method {args.method!r}: give one method")
        method = methods[0]
        if not args.question.strip():
            raise ValueError("--question is empty")
        image = resolve_image(args.image, None, "--image", root_flag=None)
        out = image_file(args.out)
    except (ValueError, TypeError) as err:
        sys.exit(f"error: {err}")

    check_family(args.model, [method] if method else [])
    model, processor = load_lvlm(args.model, args.device, args.dtype)
    if method is not None:
        _, name, overrides = method
        print(patchattn.patch(model, name, **overrides).summary())
    picture = open_image(image, {})
    if config.prompt == CarveConfig.prompt:  # not set in --config: the model's own chat template
        config = dataclasses.replace(config, prompt=carve_prompt(processor))
    plain = answer(model, processor, picture, args.question, config.answer_tokens, prompt=config.prompt)
    result = carve(model, processor, picture, args.question, config)
    result.image.save(out)
    print(f"question: {args.question}\nanswer on the image:         {plain}\n"
          f"answer on the refined image: {result.answer}\nkept {int(result.kept.sum())} of {result.kept.numel()} "
          f"token cells (grid {tuple(result.kept.shape)}, layers {result.layers}); refined image: {out}")


if __name__ == "__main__":
    main()
