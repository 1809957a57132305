"""Training data: text -> token ids -> fixed-length chunks, a held-out tail, and a deterministic sample order.

Text comes from CPython's ``pydoc_data`` (offline), local files, or a ``datasets`` dataset (network unless cached).
The token stream is cut in two: the first ``1 - holdout`` for training chunks, the last ``holdout`` for
perplexity, so evaluation never sees training text.  Which chunk each step reads is a pure function of
``(seed, step)``, so a resumed run reads exactly what the uninterrupted run would have.
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import torch

from ..data import offline_text
from ..models import ByteTokenizer
from .recipe import RecipeError, TrainConfig

__all__ = ["ByteTokenizer", "TextData", "build_data", "read_text", "token_ids"]  # ByteTokenizer lives in models


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
class TextData:
    """Training chunks (a ``datasets.Dataset`` of ``input_ids``) and held-out chunks for perplexity."""

    train: object  # datasets.Dataset with column input_ids
    heldout: torch.Tensor  # [n, eval_len]
    heldout_stream: torch.Tensor  # [tokens] the held-out tail as one stream (decode evaluation)

    def batch(self, config: TrainConfig, step: int, micro: int) -> torch.Tensor:
        """``[batch, seq_len]`` ids for optimiser step ``step`` (0-based), micro-batch ``micro``."""
        n = len(self.train)
        per_step = config.batch * config.grad_accum
        first = step * per_step + micro * config.batch
        rows = []
        for i in range(first, first + config.batch):
            epoch, slot = divmod(i, n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed * 1_000_003 + epoch))
            rows.append(self.train[int(order[slot])]["input_ids"])
        return torch.tensor(rows, dtype=torch.long)


def build_data(config: TrainConfig, tokenizer) -> TextData:
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
    train = datasets.Dataset.from_dict({"input_ids": chunks.tolist()})
    return TextData(train, heldout, held)
