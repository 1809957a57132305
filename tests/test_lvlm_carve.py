"""CARVE (``patchattn.lvlm.carve``) on a tiny LLaVA with a tiny fake processor.

No LLaVA processor can be built offline for the tiny model (a real tokenizer's ids exceed its 128-token vocabulary
and none ships in the package), so the processor here is a stand-in with the transformers interface: text to byte
ids, ``<image>`` to the model's image tokens, the image resized to the vision tower's size.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from patchattn.lvlm import CarveConfig, carve, contrast, fuse
from patchattn.lvlm.carve import attention_maps, default_layers
from patchattn.lvlm.images import apply_regions, connected_regions, keep_top_regions, top_p_cells
from patchattn.testing import LVLM_FAMILIES, tiny_model

FAMILIES = LVLM_FAMILIES
SPLIT = ("smolvlm",)  # prompts with Idefics3-style image splitting: two crops, then the global image


class FakeProcessor:
    """transformers-style processor for a tiny LVLM: one image resized to the tower's size (Qwen-VL: 4x4 patches
    after ``image_grid_thw``), the placeholder replaced by the family's image tokens; with ``crops`` the Idefics3
    layout: per crop, then the global image, two marker tokens and the image's tokens."""

    def __init__(self, model, family="llava", crops=0):
        config, vision = model.config, model.config.vision_config
        self.family, self.crops, self.image_token = family, crops, config.image_token_id
        self.qwen = family in ("qwen2_vl", "qwen2_5_vl")
        self.size = 4 * vision.patch_size if self.qwen else vision.image_size
        patches = (self.size // vision.patch_size) ** 2
        if self.qwen:
            self.tokens, self.temporal = patches // vision.spatial_merge_size ** 2, vision.temporal_patch_size
        elif family == "gemma3":
            self.tokens = config.mm_tokens_per_image
        elif family in ("idefics3", "smolvlm"):
            self.tokens = patches // config.scale_factor ** 2
        else:
            self.tokens = patches

    def resize(self, image):
        return F.interpolate(image.float()[None], size=(self.size, self.size), mode="bilinear")

    def __call__(self, text, images, return_tensors="pt"):
        before, after = text.split("<image>")
        encode = lambda s: [3 + b % 97 for b in s.encode()]
        frames = [self.resize(c) for c in images.chunk(self.crops, dim=-1)] if self.crops else []
        frames.append(self.resize(images))
        marker = [1, 2] if self.family in ("idefics3", "smolvlm") else []
        image_ids = (marker + [self.image_token] * self.tokens) * len(frames)
        ids = torch.tensor([encode(before) + image_ids + encode(after)])
        out = {"input_ids": ids}
        if self.qwen:  # [patches, 3 * temporal * p * p], 4x4 patches
            p = self.size // 4
            grid = frames[0][0].reshape(3, 4, p, 4, p).permute(1, 3, 0, 2, 4).reshape(16, -1)
            out.update(pixel_values=grid.repeat(1, self.temporal), image_grid_thw=torch.tensor([[1, 4, 4]]),
                       mm_token_type_ids=(ids == self.image_token).long())
        elif self.family in ("idefics3", "smolvlm"):
            out["pixel_values"] = torch.cat(frames)[None]
        else:
            out["pixel_values"] = frames[0]
            if self.family == "gemma3":
                out["token_type_ids"] = (ids == self.image_token).long()
        return out

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(str(int(i)) for i in row) for row in ids]


def _family_setup(family):
    model = tiny_model(family)
    return model, FakeProcessor(model, family, crops=2 if family in SPLIT else 0)


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llava")
    image = torch.rand(3, 32, 48, generator=torch.Generator().manual_seed(0))
    return model, FakeProcessor(model), image


def test_carve_returns_sensible_shapes(setup):
    model, processor, image = setup
    result = carve(model, processor, image, "What is left of the cat?", steps=3, answer_tokens=4)
    assert result.question_maps.shape == result.general_maps.shape == (3, 1, 16)
    assert result.attention_map.shape == result.kept.shape == (4, 4)
    assert result.image.shape == image.shape
    assert 1 <= int(result.kept.sum()) <= 16 * 0.4 + 1  # top-p cells only (ties aside)
    assert len(result.answer.split()) == 4
    masked_out = F.interpolate(result.kept[None, None].float(), size=(32, 48), mode="nearest")[0, 0] == 0
    assert torch.all(result.image[:, masked_out] == 0) and torch.equal(result.image[:, ~masked_out],
                                                                     image[:, ~masked_out])
    assert result.layers == [1]  # 20/32 and 25/32 of 2 layers, clipped
    cropped = carve(model, processor, image, "What is left of the cat?", steps=2, answer_tokens=2, mode="crop")
    assert cropped.image.shape == image.shape


def test_contrast_and_fusion_match_a_manual_computation():
    gen = torch.Generator().manual_seed(1)
    q, g = torch.rand(3, 2, 6, generator=gen), torch.rand(3, 2, 6, generator=gen)
    lam = 0.05
    got = fuse(contrast(q, g, lam), (2, 3))
    want = torch.zeros(6)
    for t in range(3):
        for layer in range(2):
            for n in range(6):
                want[n] += (t + 1) * q[t, layer, n] / (g[t, layer, n] + lam)
    assert torch.allclose(got, want.reshape(2, 3), rtol=1e-6)
    end = fuse(contrast(q, g, lam), (2, 3), time="end")
    assert torch.allclose(end, (q[2] / (g[2] + lam)).sum(0).reshape(2, 3))


@pytest.mark.parametrize("family", FAMILIES)
def test_maps_are_the_models_own_attention(setup, family):
    """Step 0's map is the last prompt row of an eager forward's attention over the image tokens (with split
    images: over the global image's tokens, the last tower image's)."""
    image = setup[2]
    model, processor = _family_setup(family)
    inputs = processor(text="USER: <image>\nhi ASSISTANT:", images=image)
    maps = attention_maps(model, inputs, [0, 1], steps=2)
    eager = tiny_model(family)
    eager.config.get_text_config()._attn_implementation_internal = "eager"
    with torch.no_grad():
        out = eager(**inputs, output_attentions=True)
    image_pos = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    if family in SPLIT:
        assert image_pos.numel() == 3 * processor.tokens
        image_pos = image_pos[-processor.tokens:]
    assert maps.shape == (2, 2, processor.tokens)
    for i, layer in enumerate((0, 1)):
        want = out.attentions[layer][0].mean(0)[-1, image_pos]
        assert torch.allclose(maps[0, i], want, atol=1e-6)
    # step 1 (a decode step over the cache; Gemma 3's sliding layers keep only their newest keys) is the last row of
    # one eager forward over the prompt and the first generated token
    with torch.no_grad():
        token = out.logits[:, -1:].argmax(-1)
        grown = {k: torch.cat([v, torch.zeros_like(token)], 1) for k, v in inputs.items()
                 if k in ("mm_token_type_ids", "token_type_ids")}
        full = eager(**{**inputs, **grown, "input_ids": torch.cat([inputs["input_ids"], token], 1)},
                     output_attentions=True)
    for i, layer in enumerate((0, 1)):
        assert torch.allclose(maps[1, i], full.attentions[layer][0].mean(0)[-1, image_pos], atol=1e-6)
    assert model.config.get_text_config()._attn_implementation == "sdpa"  # restored


@pytest.mark.parametrize("family", FAMILIES[1:])
def test_every_family_refines_on_its_token_grid(setup, family):
    image = setup[2]
    model, processor = _family_setup(family)
    result = carve(model, processor, image, "What is left of the cat?", steps=2, answer_tokens=2)
    side = math.isqrt(processor.tokens)
    assert result.attention_map.shape == result.kept.shape == (side, side)
    assert result.question_maps.shape == (2, 1, processor.tokens) and result.image.shape == image.shape
    assert 1 <= int(result.kept.sum()) <= processor.tokens * 0.4 + 1


def test_regions_thresholds_and_components():
    score = torch.tensor([[9.0, 8.0, 0.0, 0.0], [0.0, 0.0, 0.0, 7.0], [1.0, 0.0, 0.0, 6.5], [0.0, 0.0, 0.0, 0.0]])
    cells = top_p_cells(score, 0.25)  # 4 of 16 cells
    assert int(cells.sum()) == 4
    assert sorted(len(r) for r in connected_regions(cells)) == [2, 2]
    kept = keep_top_regions(score, cells, 1)
    assert kept[0, 0] and kept[0, 1] and not kept[1, 3]  # 17 beats 13.5
    assert torch.equal(top_p_cells(score, 1.0), torch.ones(4, 4, dtype=torch.bool))
    pixels = torch.ones(3, 8, 8)
    masked = apply_regions(pixels, kept, "mask")
    assert masked[:, :2, :4].eq(1).all() and masked[:, 2:].eq(0).all()


def test_bad_settings_are_refused(setup):
    model, processor, image = setup
    with pytest.raises(ValueError, match="mode"):
        CarveConfig(mode="blur")
    with pytest.raises(ValueError, match="layers"):
        carve(model, processor, image, "q", layers=[5])
    assert default_layers(32) == [20, 25] and default_layers(28) == [18, 22]
    with pytest.raises(ValueError, match="image placeholder"):
        CarveConfig(prompt="USER: {instruction} ASSISTANT:")
    for placeholder in ("<image>", "<|image_pad|>", "<start_of_image>"):  # LLaVA / Idefics3, Qwen-VL, Gemma 3
        assert CarveConfig(prompt=f"{placeholder}{{instruction}}").prompt.format(instruction="q") == placeholder + "q"
