"""Training data: text -> token ids -> fixed-length chunks, a held-out tail, and a deterministic sample order.

Text comes from CPython's ``pydoc_data`` (offline), local files, or a ``datasets`` dataset (network unless cached).
The token stream is cut in two: the first ``1 - holdout`` for training chunks, the last ``holdout`` for
perplexity, so evaluation never sees training text.  Which chunk each step reads is a pure function of
``(seed, step)``, so a resumed run reads exactly what the uninterrupted run would have.

Images (``data.images``, LLaVA models): each chunk keeps its length; the image's tokens replace the chunk's tokens
after the first one and are left out of the loss (labels -100).  Chunk ``i`` gets image ``i mod n``.  Pixels are
resized to the vision tower's size and normalised with CLIP's mean and std (LLaVA's processor does the same for
square images; its padding to a square is not done).  A minimal path: one image per chunk, no captions pairing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data import offline_text
from ..models import ByteTokenizer
from .recipe import RecipeError, TrainConfig

__all__ = ["ByteTokenizer", "ImageData", "TextData", "build_data", "read_text", "token_ids"]

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SYNTHETIC_IMAGES = 8  # ByteTokenizer lives in models


def read_text(data: dict) -> str:
    """The raw text of a ``data`` entry (see ``TrainConfig.data``)."""
    if "text" in data:
        return offline_text(data["text"])
    if "files" in data:
        parts = []
        for path in data["files"]:
            try:
                with open(path, encoding="utf-8") as handle:
                    parts.append(handle.read())
            except FileNotFoundError:
                raise RecipeError(f"train.json: data file {path!r} not found") from None
        return "\n\n".join(parts)
    import datasets  # only a hub dataset needs it (and its pandas / pyarrow)

    dataset = datasets.load_dataset(data["dataset"], data.get("config"), split=data.get("split", "train"))
    column = data.get("column", "text")
    if column not in dataset.column_names:
        raise RecipeError(f"train.json: dataset {data['dataset']!r} has no column {column!r}; "
                          f"columns: {', '.join(dataset.column_names)}")
    return "\n\n".join(dataset[column])


def token_ids(tokenizer, text: str) -> torch.Tensor:
    if isinstance(tokenizer, ByteTokenizer):
        return torch.tensor(tokenizer.encode(text), dtype=torch.long)
    return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)


@dataclass
class ImageData:
    """One image per chunk for a LLaVA model: ``pixels [n, 3, S, S]`` (normalised), ``tokens`` image tokens each."""

    pixels: torch.Tensor
    token_id: int
    tokens: int
    pad_id: int = 0

    def attach(self, ids: torch.Tensor, first: int) -> dict:
        """Forward kwargs for chunks ``ids [B, T]`` numbered ``first, first + 1, ...``: image tokens at ``1 ..
        tokens``, labels -100 there, ``pixel_values`` of images ``first mod n, ...``."""
        if ids.shape[1] < self.tokens + 2:
            raise RecipeError(f"seq_len {ids.shape[1]} is too short for an image of {self.tokens} tokens plus text")
        ids = ids.masked_fill(ids == self.token_id, self.pad_id)  # a text byte may equal the image token's id
        ids[:, 1:1 + self.tokens] = self.token_id
        labels = ids.masked_fill(ids == self.token_id, -100)
        which = torch.arange(first, first + ids.shape[0]) % self.pixels.shape[0]
        return {"input_ids": ids, "labels": labels, "pixel_values": self.pixels[which]}


def first_row(config: TrainConfig, step: int, micro: int, rank: int = 0, world: int = 1) -> int:
    """Index (in the epoch-shuffled stream of training rows) of the first row of this micro-batch of this process."""
    return ((step * world + rank) * config.grad_accum + micro) * config.batch


@dataclass
class TextData:
    """Training chunks and held-out chunks for perplexity."""

    train: torch.Tensor  # [n_chunks, seq_len] token ids
    heldout: torch.Tensor  # [n, eval_len]
    heldout_stream: torch.Tensor  # [tokens] the held-out tail as one stream (decode evaluation)
    images: ImageData | None = None

    def inputs(self, config: TrainConfig, step: int, micro: int, rank: int = 0, world: int = 1) -> dict:
        """Forward kwargs (with ``labels``) of optimiser step ``step``, micro-batch ``micro``, for process ``rank`` of
        ``world`` (data parallel: each process reads its own rows)."""
        ids = self.batch(config, step, micro, rank, world)
        if self.images is None:
            return {"input_ids": ids, "labels": ids}
        return self.images.attach(ids, first_row(config, step, micro, rank, world))

    def heldout_inputs(self, ids: torch.Tensor, index: int) -> dict:
        """Forward kwargs of held-out chunk ``index`` (``ids [1, T]``); ``labels`` mark what the loss counts."""
        if self.images is None:
            return {"input_ids": ids, "labels": ids}
        return self.images.attach(ids, index)

    def batch(self, config: TrainConfig, step: int, micro: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        """``[batch, seq_len]`` ids for optimiser step ``step`` (0-based), micro-batch ``micro``, process ``rank`` of
        ``world``: an optimiser step reads ``world`` times ``batch * grad_accum`` rows, each process its own share, in
        the order of a one-process run of ``world`` times the batch."""
        n = len(self.train)
        first = first_row(config, step, micro, rank, world)
        rows = []
        for i in range(first, first + config.batch):
            epoch, slot = divmod(i, n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed * 1_000_003 + epoch))
            rows.append(self.train[int(order[slot])])
        return torch.stack(rows).long()


def _read_image(path: str) -> torch.Tensor:
    try:
        import numpy as np
        from PIL import Image
    except ImportError:  # pragma: no cover
        raise RecipeError("train.json: data.images needs Pillow to read image files") from None
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise RecipeError(f"train.json: image file {path!r} not found") from None
    return torch.from_numpy(array).permute(2, 0, 1)


def build_images(config: TrainConfig, model) -> ImageData | None:
    """The recipe's images for ``model`` (LLaVA only), or None for text-only data."""
    spec = config.data.get("images")
    if spec is None:
        return None
    if getattr(getattr(model, "config", None), "model_type", None) != "llava":
        raise RecipeError("train.json: data.images is supported for LLaVA models only (one image of "
                          "(image_size / patch_size)^2 tokens per chunk); got model type "
                          f"{getattr(getattr(model, 'config', None), 'model_type', None)!r}")
    vision = model.config.vision_config
    size = vision.image_size
    tokens = (size // vision.patch_size) ** 2 + (model.config.vision_feature_select_strategy == "full")
    if spec == "synthetic":
        raw = torch.rand(SYNTHETIC_IMAGES, 3, size, size, generator=torch.Generator().manual_seed(config.seed))
    else:
        raw = torch.stack([F.interpolate(_read_image(p)[None], size=(size, size), mode="bicubic",
                                         align_corners=False)[0].clamp(0, 1) for p in spec])
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    pad = model.config.get_text_config().pad_token_id
    return ImageData((raw - mean) / std, model.config.image_token_id, tokens, pad if pad is not None else 0)


def build_data(config: TrainConfig, tokenizer, model=None) -> TextData:
    ids = token_ids(tokenizer, read_text(config.data))
    split = int(len(ids) * (1 - config.holdout))
    train_ids, held = ids[:split], ids[split:]
    n_train = len(train_ids) // config.seq_len
    if n_train < 1:
        raise RecipeError(f"the text has {len(ids)} tokens: too few for one training chunk of seq_len "
                          f"{config.seq_len} (holdout {config.holdout})")
    chunks = train_ids[: n_train * config.seq_len].view(n_train, config.seq_len)
    length = config.eval_length
    n_eval = min(config.eval_chunks, len(held) // length)
    if n_eval < 1:
        raise RecipeError(f"the held-out text has {len(held)} tokens: too few for one evaluation chunk of "
                          f"{length} tokens; raise holdout or lower eval_seq_len")
    heldout = held[: n_eval * length].view(n_eval, length)
    return TextData(chunks.clone(), heldout, held, build_images(config, model))
