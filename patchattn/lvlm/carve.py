"""CARVE (Ge et al., Focusing by Contrastive Attention: Enhancing VLMs' Visual Reasoning, arXiv 2509.06461): a
training-free, input-level pipeline that uses the model's own text->image attention to find what a question is
about, then re-asks the question on the image reduced to those regions.

1. general pass: the model answers a general instruction (``"Write a general description of the image."``) for
   ``steps`` greedy tokens; at every step ``t`` and selected layer ``l`` the new token's attention over the image
   tokens, averaged over heads, is ``A^G[t, l] in R^{N_v}``;
2. question pass: the same with the question, ``A^Q[t, l]``;
3. contrast ``C[t, l] = A^Q[t, l] / (A^G[t, l] + lambda)`` (the closed-form minimiser of the paper's
   reconstruction + visual-suppression objective): what the question looks at beyond what any description looks at;
4. fusion ``S = sum_t w_t sum_l C[t, l]`` on the token grid, ``w_t = t - t_start + 1`` (later tokens weigh more);
   ``time="end"`` keeps only the last step;
5. the top ``top_p`` share of cells, their 4-connected regions, the ``regions`` ones with the largest summed ``S``;
6. the image masked (or cropped to the regions' box and resized back); pass 3 answers the question on it.

With Idefics3 / SmolVLM image splitting the map is the global image's grid (the crops' tokens are not read).
Attention maps are read with eager attention in the text backbone (``output_attentions``), switched on only for
passes 1-2; pass 3 runs the model as it is.  ``processor`` is any callable with the transformers processor interface
(``processor(text=, images=, return_tensors="pt")`` -> ``input_ids``, ``pixel_values``, optionally
``image_grid_thw``; ``processor.batch_decode(ids, skip_special_tokens=True)``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, replace

import torch

from .images import apply_regions, as_tensor, keep_top_regions, like_input, top_p_cells

__all__ = ["CarveConfig", "CarveResult", "carve", "contrast", "default_layers", "fuse", "image_grid"]

PAPER_DEPTH = 32  # LLaVA-1.5-7B / Qwen2.5-VL-7B: the paper's layers [20, 25] are for 32 (28) layers
# The text that a processor expands into an image's tokens: LLaVA / Idefics3 / SmolVLM, Qwen2-VL / Qwen2.5-VL, Gemma 3
IMAGE_PLACEHOLDERS = ("<image>", "<|image_pad|>", "<start_of_image>")


@dataclass
class CarveConfig:
    """CARVE's settings; defaults are the paper's best (layers 20 and 25 of 32, scaled to the model; p in
    [0.2, 0.6] -> 0.4; K = 2; weighted fusion over all steps)."""

    general_instruction: str = "Write a general description of the image."
    prompt: str = "USER: <image>\n{instruction} ASSISTANT:"
    layers: list[int] | None = None  # None: round(20/32 * depth), round(25/32 * depth), clipped
    steps: int = 8  # generated tokens whose attention is read, per pass
    time: str = "full"  # "full": weighted sum over steps; "end": the last step only
    lam: float = 1e-3  # the contrast's regulariser lambda (paper appendix not captured; see design notes)
    top_p: float = 0.4
    regions: int = 2
    mode: str = "mask"  # "mask" or "crop"
    fill: float = 0.0  # value of masked-out pixels (in the image's own range)
    answer_tokens: int = 32

    def __post_init__(self):
        if self.time not in ("full", "end"):
            raise ValueError(f"CarveConfig.time must be 'full' or 'end', got {self.time!r}")
        if self.mode not in ("mask", "crop"):
            raise ValueError(f"CarveConfig.mode must be 'mask' or 'crop', got {self.mode!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"CarveConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.lam <= 0:
            raise ValueError(f"CarveConfig.lam must be > 0, got {self.lam}")
        for name in ("steps", "regions", "answer_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"CarveConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not any(p in self.prompt for p in IMAGE_PLACEHOLDERS) or "{instruction}" not in self.prompt:
            raise ValueError(f"CarveConfig.prompt must contain an image placeholder ({', '.join(IMAGE_PLACEHOLDERS)}) "
                             "and '{instruction}'")


@dataclass
class CarveResult:
    """What CARVE produced: the refined image (same type and size as the input), the fused map ``S`` and the kept
    cells on the token grid ``[h, w]``, the answer on the refined image, and the raw maps ``[steps, layers, N_v]``."""

    image: object
    attention_map: torch.Tensor
    kept: torch.Tensor
    answer: str
    question_maps: torch.Tensor
    general_maps: torch.Tensor
    layers: list[int] = field(default_factory=list)


def default_layers(depth: int) -> list[int]:
    """The paper's layers 20 and 25 (of 32) at the same relative depth of a ``depth``-layer backbone."""
    picked = [min(depth - 1, round(layer * depth / PAPER_DEPTH)) for layer in (20, 25)]
    return sorted(set(picked))


def contrast(question: torch.Tensor, general: torch.Tensor, lam: float) -> torch.Tensor:
    """``A^Q / (A^G + lambda)``, elementwise (maps of the same shape)."""
    if question.shape != general.shape:
        raise ValueError(f"question maps {tuple(question.shape)} and general maps {tuple(general.shape)} differ")
    return question / (general + lam)


def fuse(contrasted: torch.Tensor, grid: tuple[int, int], time: str = "full") -> torch.Tensor:
    """``S [h, w] = sum_t w_t sum_l C[t, l]`` of ``contrasted [T, L, N_v]``; ``w_t = t + 1`` (``t_start = 0``), or
    the last step only (``time="end"``)."""
    steps = contrasted.shape[0]
    weights = torch.arange(1, steps + 1, dtype=contrasted.dtype) if time == "full" else \
        torch.eye(steps, dtype=contrasted.dtype)[-1]
    fused = (weights[:, None] * contrasted.sum(1)).sum(0)
    return fused.reshape(grid)


def image_grid(inputs, model, n_image: int) -> tuple[int, int]:
    """``(h, w)`` of the image tokens: Qwen-VL's ``image_grid_thw`` after its spatial merge, else a square."""
    thw = inputs.get("image_grid_thw") if hasattr(inputs, "get") else None
    if thw is not None:
        merge = getattr(model.config.vision_config, "spatial_merge_size", 1)
        _, h, w = (int(x) for x in thw[0])
        grid = (h // merge, w // merge)
    else:
        side = math.isqrt(n_image)
        grid = (side, side)
    if grid[0] * grid[1] != n_image:
        raise ValueError(f"CARVE: {n_image} image tokens do not form the grid {grid}; one image per prompt only")
    return grid


@contextlib.contextmanager
def _eager_text_attention(model):
    """Eager attention in the text backbone (attention probabilities can be returned), restored afterwards."""
    configs = {id(c): c for c in (model.config, model.config.get_text_config())}.values()
    previous = [(c, c._attn_implementation_internal) for c in configs]
    try:
        for c, _ in previous:
            c._attn_implementation_internal = "eager"
        yield
    finally:
        for c, impl in previous:
            c._attn_implementation_internal = impl


def _prompt_inputs(processor, model, image, instruction: str, config: CarveConfig):
    text = config.prompt.format(instruction=instruction)
    inputs = processor(text=text, images=image, return_tensors="pt")
    device = next(model.parameters()).device
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in dict(inputs).items()}


def _generate(model, inputs, tokens: int, **extra):
    return model.generate(**inputs, max_new_tokens=tokens, do_sample=False, **extra)


def image_positions(inputs, model) -> torch.Tensor:
    """Positions of the image tokens CARVE maps, in the first prompt: all of them, except with Idefics3 / SmolVLM
    image splitting (``pixel_values [1, images, C, H, W]``: the crops, then the global image, each its own grid of
    tokens in that order): the global image's, the one grid that covers the whole picture."""
    image = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    pixels = inputs.get("pixel_values") if hasattr(inputs, "get") else None
    if torch.is_tensor(pixels) and pixels.dim() == 5 and pixels.shape[1] > 1:
        image = image[-(image.numel() // pixels.shape[1]):]
    return image


@torch.no_grad()
def attention_maps(model, inputs, layers: list[int], steps: int) -> torch.Tensor:
    """``[steps, len(layers), N_v]``: each generated token's attention over the image tokens, mean over heads."""
    image = image_positions(inputs, model)
    with _eager_text_attention(model):
        out = _generate(model, inputs, steps, min_new_tokens=steps, output_attentions=True,
                        return_dict_in_generate=True)
    prompt = inputs["input_ids"].shape[1]
    maps = [torch.stack([_image_columns(step[layer][0].float().mean(0)[-1], image, prompt + t) for layer in layers])
            for t, step in enumerate(out.attentions)]
    return torch.stack(maps[:steps]).cpu()


def _image_columns(row: torch.Tensor, image: torch.Tensor, length: int) -> torch.Tensor:
    """The attention of ``row`` (over the call's keys: the last ``row.numel()`` of the ``length`` tokens so far; a
    sliding-window layer's cache keeps only its newest, as Gemma 3's local layers) on the ``image`` positions; 0 for
    image tokens that left the window."""
    columns = image.to(row.device) - (length - row.numel())
    inside = columns >= 0
    return torch.where(inside, row[columns.clamp_min(0)], torch.zeros((), dtype=row.dtype, device=row.device))


def carve(model, processor, image, question: str, config: CarveConfig | None = None, **overrides) -> CarveResult:
    """Run CARVE on one image and question (see the module docstring); ``overrides`` replace ``config`` fields."""
    config = replace(config or CarveConfig(), **overrides)
    depth = model.config.get_text_config().num_hidden_layers
    layers = config.layers if config.layers is not None else default_layers(depth)
    bad = [layer for layer in layers if not 0 <= layer < depth]
    if bad or not layers:
        raise ValueError(f"CARVE layers {layers}: the text backbone has layers 0..{depth - 1}")
    was_training = model.training
    model.eval()
    try:
        general_inputs = _prompt_inputs(processor, model, image, config.general_instruction, config)
        question_inputs = _prompt_inputs(processor, model, image, question, config)
        general = attention_maps(model, general_inputs, layers, config.steps)
        asked = attention_maps(model, question_inputs, layers, config.steps)
        grid = image_grid(question_inputs, model, asked.shape[-1])
        score = fuse(contrast(asked, general, config.lam), grid, config.time)
        kept = keep_top_regions(score, top_p_cells(score, config.top_p), config.regions)
        refined = like_input(apply_regions(as_tensor(image), kept, config.mode, config.fill), image)
        answer_inputs = _prompt_inputs(processor, model, refined, question, config)
        with torch.no_grad():
            ids = _generate(model, answer_inputs, config.answer_tokens)
        new = ids[:, answer_inputs["input_ids"].shape[1]:]
        answer = processor.batch_decode(new, skip_special_tokens=True)[0]
    finally:
        model.train(was_training)
    return CarveResult(refined, score, kept, answer, asked, general, list(layers))
