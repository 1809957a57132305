"""Eager oracles for the LVLM last-row methods (``vhr``, ``paint``): full ``T x T`` attention on tiny models.

An oracle model is a second copy of the tiny LVLM (same seed, same weights) whose text backbone runs an attention
function registered with transformers directly (not a patchattn method): it materialises every probability and
applies the paper's edit as the papers' code would (the released PAINT code edits ``attn_weights[:, :, -1, tokens]``
before the softmax; VHR renormalises the last row without the image columns).  Shared by ``tests/methods/test_vhr.py``
and ``tests/methods/test_paint.py`` (``from lvlm_cases import ...``).
"""

from __future__ import annotations

import numpy as np
import torch

from patchattn.testing import LVLM_FAMILIES, left_pad, tiny_inputs, tiny_model

FAMILIES = LVLM_FAMILIES
SPLIT = "smolvlm"  # the family whose test prompts use Idefics3-style image splitting (idefics3 keeps one image)


def split_inputs(model, *, images: int = 3, batch: int = 2, tail: int = 8, seed: int = 0) -> dict:
    """An Idefics3 / SmolVLM prompt as its processor lays out a split image: per tower image (crops, then the global
    image) two text tokens (``<fake_token_around_image>``, ``<row_i_col_j>`` / ``<global-img>``) and the image's
    tokens, then ``tail`` text tokens; ``pixel_values`` ``[B, images, 3, H, W]``."""
    gen = torch.Generator().manual_seed(seed)
    config = model.config
    vision = config.vision_config
    n_image = (vision.image_size // vision.patch_size) ** 2 // config.scale_factor ** 2
    text = lambda n: torch.randint(3, 100, (batch, n), generator=gen)
    parts = []
    for _ in range(images):
        parts += [text(2), torch.full((batch, n_image), config.image_token_id)]
    ids = torch.cat([*parts, text(tail)], dim=1)
    size = vision.image_size
    return {"input_ids": ids, "pixel_values": torch.randn(batch, images, 3, size, size, generator=gen)}


def family_inputs(model, family: str, text_len: int = 12) -> dict:
    """The tests' prompt for ``family``: ``tiny_inputs`` (one image), split images for ``SPLIT``."""
    return split_inputs(model) if family == SPLIT else tiny_inputs(model, family, text_len=text_len)


def padded_inputs(model, family: str):
    """A batch of two with the second row left-padded by 3 tokens (its images stay inside)."""
    return left_pad(family_inputs(model, family, text_len=14), [0, 3])


def full_probs(module, query, key, attention_mask, scaling, softcap=None, edit=None):
    """``[B, H, Tq, Tk]`` probabilities (GQA repeated); ``edit(scores)`` may change the masked scores first."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, 1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    q_len, k_len = query.shape[2], key.shape[2]
    allowed = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)[None, None]
    if attention_mask is not None:
        mask = attention_mask[:, :, :, :k_len]
        allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    if edit is not None:
        scores = edit(scores)
    return torch.softmax(scores, dim=-1)


class Oracle:
    """The oracle attention of one model: ``image`` (bool ``[B, T]`` over the prompt) and per-kind parameters are
    set by the test; ``heads`` keeps VHR's choice per layer."""

    def __init__(self, kind: str, **params):
        self.kind, self.params = kind, params
        self.image: torch.Tensor | None = None
        self.local: torch.Tensor | None = None
        self.summary: torch.Tensor | None = None
        self.heads: dict[int, torch.Tensor] = {}
        self.slots: dict[int, int] = {}
        self.vhd: dict[int, torch.Tensor] = {}

    def keys_mask(self, mask: torch.Tensor, kv_len: int, slots: int) -> torch.Tensor:
        """The prompt's mask on the call's keys: the last ``kv_len`` of ``slots`` (Gemma 3's sliding-window layers
        keep only their newest keys in the cache)."""
        return torch.cat([mask, mask.new_zeros(mask.shape[0], slots - mask.shape[1])], dim=1)[:, slots - kv_len:]

    def __call__(self, module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, softcap=None,
                 **kwargs):
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        groups = query.shape[1] // key.shape[1]
        value_full = value.repeat_interleave(groups, 1)
        layer = module.layer_idx
        if self.kind == "paint":
            q_len, kv_len = query.shape[2], key.shape[2]
            self.slots[layer] = kv_len if q_len == kv_len else self.slots[layer] + q_len
            edit = self.paint_edit(layer, kv_len, self.slots[layer])
            probs = full_probs(module, query, key, attention_mask, scaling, softcap, edit)
            return torch.matmul(probs, value_full).transpose(1, 2).contiguous(), None
        probs = full_probs(module, query, key, attention_mask, scaling, softcap)
        out = torch.matmul(probs, value_full)
        if layer not in self.params["layers"]:
            return out.transpose(1, 2).contiguous(), None
        if query.shape[2] == key.shape[2] and self.image is not None:
            self.choose(layer, probs[:, :, -1], value_full)
        heads = self.heads.get(layer)
        if heads is not None:
            gains = torch.where(heads, self.params["alpha"], 1.0)[:, :, None, None]
            if self.params.get("rows", "all") == "generated" and query.shape[2] > 1:
                out = torch.cat([out[:, :, :-1], out[:, :, -1:] * gains], dim=2)
            else:
                out = out * gains
        return out.transpose(1, 2).contiguous(), None

    # -- VHR: the last row without the image columns, renormalised; numpy statistics
    def choose(self, layer, last, value_full):
        image = self.image.to(torch.bool)
        without = last * ~image[:, None, :]
        seen = (last * image[:, None, :]).sum(-1, keepdim=True) > 0  # removing unseen keys changes nothing
        without = torch.where(seen, without / without.sum(-1, keepdim=True), last)
        a_with = torch.einsum("bhk,bhkd->bhd", last, value_full)
        a_without = torch.einsum("bhk,bhkd->bhd", without, value_full)
        heads, vhds = [], []
        for b in range(last.shape[0]):
            vhd = np.linalg.norm((a_with[b] - a_without[b]).double().numpy(), axis=-1)
            ta = (a_without[b].double().numpy() ** 2).sum(-1)
            outlier = (vhd > vhd.mean() + vhd.std()) & (ta > ta.mean() + ta.std())
            vhd = np.where(outlier, 0.0, vhd)
            heads.append(torch.from_numpy(vhd > np.median(vhd)))
            vhds.append(torch.from_numpy(vhd))
        self.heads[layer], self.vhd[layer] = torch.stack(heads), torch.stack(vhds)

    # -- PAINT: the released code's edit of the last row's scores
    def paint_edit(self, layer, kv_len, slots):
        if layer not in self.params["layers"] or self.local is None:
            return None
        local, summary = self.keys_mask(self.local, kv_len, slots), self.keys_mask(self.summary, kv_len, slots)

        def edit(scores):
            scores = scores.clone()
            last = scores[:, :, -1]
            for b in range(scores.shape[0]):
                for cols, c in ((local[b], self.params["alpha"]), (summary[b], self.params["beta"])):
                    last[b][:, cols] = last[b][:, cols].abs() * c + last[b][:, cols]
            return scores

        return edit


def oracle_model(family: str, oracle: Oracle, name: str):
    """A tiny ``family`` model (same weights as ``tiny_model(family)``) whose text backbone runs ``oracle``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, oracle)
    AttentionMaskInterface.register(name, sdpa_mask)
    model = tiny_model(family)
    model.config.text_config._attn_implementation_internal = name
    return model


def image_mask(model, inputs) -> torch.Tensor:
    ids = [model.config.image_token_id] + ([model.config.video_token_id] if hasattr(model.config, "video_token_id")
                                           else [])
    return torch.isin(inputs["input_ids"], torch.tensor(ids))
