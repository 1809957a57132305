"""``PatchAttnLM``: lm-eval's HuggingFace model, loaded with ``patchattn.load`` and patched with a method."""

from __future__ import annotations

import json

import torch

from . import require_lm_eval

require_lm_eval()

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .. import api
from ..api import mean_stat
from .quiet import model_object_notes


def parse_method_args(method_args) -> dict:
    """Config overrides from a dict, a JSON object string, or ``"key:value;key:value"``.

    The last form exists because lm-eval's command line rejects braces inside ``key=value`` model arguments
    (``method_args=window:512;sink_tokens:4``); the JSON forms work from Python and inside a JSON ``--model_args``.
    """
    if method_args in (None, "", {}):
        return {}
    if isinstance(method_args, dict):
        return dict(method_args)
    text = str(method_args).strip()
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"method_args is not valid JSON: {text!r} ({err})") from err
        if not isinstance(parsed, dict):
            raise ValueError(f"method_args must be a JSON object, got {text!r}")
        return parsed
    overrides = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        key, sep, value = item.partition(":")
        if not sep:
            raise ValueError(f"method_args must be a JSON object or 'key:value;key:value', got {text!r}")
        overrides[key.strip()] = _literal(value.strip())
    return overrides


def _literal(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


class DensityMeter:
    """Token-weighted mean density of the prefill calls of a patched model (decode steps are not counted)."""

    def __init__(self, model):
        self.tokens = 0
        self.weighted = 0.0
        self._hook = model.register_forward_hook(self._after_forward, with_kwargs=True)
        self._model = model

    def _after_forward(self, _module, args, kwargs, _output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or ids.shape[-1] < 2:
            return
        density = mean_stat(self._model, "density")
        n = ids.numel()
        self.tokens += n
        self.weighted += n * (1.0 if density is None else density)

    @property
    def density(self) -> float | None:
        return self.weighted / self.tokens if self.tokens else None

    def reset(self) -> None:
        self.tokens, self.weighted = 0, 0.0

    def close(self) -> None:
        self._hook.remove()


def _device(requested: str | None) -> torch.device:
    if requested and requested.startswith("cuda") and not torch.cuda.is_available():
        return torch.device("cpu")  # as lm-eval's hf model does on a machine without CUDA
    return torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))


@register_model("patchattn")
class PatchAttnLM(HFLM):
    """lm-eval model ``patchattn``: ``pretrained=<smollm2 | gemma3-270m | local path>,method=<name>,
    method_args=<JSON object of config overrides>,targets=<text|vision|all>,dtype=<float32|bfloat16|...>``.

    ``pretrained`` may also be a model object (then pass ``tokenizer=``); every other argument is lm-eval's ``hf``
    model's (``max_length``, ``batch_size``...).  ``self.density`` is the mean density of the prefill calls so far.
    """

    def __init__(self, pretrained="smollm2", method: str | None = "dense", method_args=None, targets: str = "text",
                 dtype="float32", device: str | None = None, tokenizer=None, **kwargs):
        overrides = parse_method_args(method_args)
        if method:
            api.get_spec(method)  # unknown names fail here, listing the known ones, before a model is loaded
        torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
        if isinstance(pretrained, str):
            model, loaded_tokenizer = api.load(pretrained, dtype=torch_dtype if torch_dtype != "auto" else None)
            tokenizer = tokenizer or loaded_tokenizer
        else:
            model = pretrained
            if tokenizer is None:
                raise ValueError("a model object needs its tokenizer: PatchAttnLM(model, tokenizer=tokenizer)")
        model.to(_device(device))
        if method:
            self.handle = api.patch(model, method, targets=targets, **overrides)
        else:
            self.handle = api.get_handle(model)
        self.method_name = self.handle.method if self.handle else "unpatched"
        self.method_config = self.handle.config.to_dict() if self.handle else {}
        with model_object_notes():  # handing HFLM our model object is the design, not a launch mistake
            super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)
        self.meter = DensityMeter(model)

    @property
    def density(self) -> float | None:
        return self.meter.density

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info.update(patchattn_method=self.method_name, patchattn_config=self.method_config)
        return info
