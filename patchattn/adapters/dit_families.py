"""What we know about each supported diffusers DiT, as data.

The diffusers adapter (``adapters/diffusers.py``) has no per-model code: everything that differs between DiTs
lives in one ``DiTFamily`` row here.

- **Which attention modules are what.**  Attention modules are recognised by their attribute name inside their
  block (``attn``, ``attn1``, ``attn2``), or by a glob on their qualified name where one attribute name has several
  roles (HunyuanVideo's text refiner), and given a role:
  ``"joint"`` (text and image tokens concatenated in one self-attention), ``"self"`` (image/video tokens only),
  ``"cross"`` (image/video queries, text keys) or ``"text"`` (text tokens only: a text refiner; always dense).  A DiT attention module whose name is not in the row is refused at
  patch time, so a diffusers refactor cannot silently leave a layer unpatched or mislabelled.
- **Token order in joint attention**: FLUX and CogVideoX put text first, SD3 puts the image first.
- **The latent grid** in tokens after patchify, read from the transformer's own input: either the axes of the
  ``hidden_states`` latent divided by the patch sizes from the model config, or (FLUX, whose latents arrive packed
  as a sequence) the position ids ``img_ids``.
- **The text length**: the sequence length of ``encoder_hidden_states``.

Adding a DiT is one row plus a tiny config in the tests.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

ROLES = ("joint", "self", "cross", "text")


@dataclass(frozen=True)
class DiTFamily:
    """One diffusers DiT transformer class.

    Attributes:
        name: short family name (``"flux"``), reported by ``PatchHandle.family`` and ``PatchContext.family``.
        class_name: the diffusers transformer class (subclasses match too).
        attention_roles: attribute name of an attention module in its block (or a glob on its qualified name,
            tried first) -> a role of ``ROLES``.
        joint_order: order of the token kinds in joint attention, ``("text", "image")`` or ``("image", "text")``;
            empty when the family has no joint attention.
        latent_axes: axes of the ``hidden_states`` input, e.g. ``"BCHW"`` or ``"BFCHW"`` (``F`` frames, ``H``
            height, ``W`` width), ``"ids"`` when the latent is packed and the grid is read from ``ids_input``, or
            ``"args"`` when it is packed and the forward takes the grid as ``grid_inputs``.
        patch: patch size along (frames, height, width): an int, a config attribute, or ``"attr[i]"`` for one entry
            of a tuple attribute; a config value of None counts as 1.
        ids_input: forward argument holding per-token ``(frame, row, column)`` position ids (packed latents).
        grid_inputs: forward arguments holding (frames, height, width) of the latent before patchify (``"args"``).
        text_input: forward argument holding the text tokens.
        notes: what is special about the family (shown in the support matrix).
    """

    name: str
    class_name: str
    attention_roles: dict[str, str]
    joint_order: tuple[str, ...] = ()
    latent_axes: str = "BCHW"
    patch: tuple[int | str, int | str, int | str] = (1, "patch_size", "patch_size")
    ids_input: str | None = None
    grid_inputs: tuple[str, str, str] | None = None
    text_input: str = "encoder_hidden_states"
    notes: str = field(default="")


DIT_FAMILIES: dict[str, DiTFamily] = {
    f.class_name: f
    for f in [
        DiTFamily(
            "flux", "FluxTransformer2DModel", {"attn": "joint"}, ("text", "image"), latent_axes="ids",
            ids_input="img_ids",
            notes="dispatch_attention_fn; double- and single-stream blocks both attend over [text; image]",
        ),
        DiTFamily(
            "sd3", "SD3Transformer2DModel", {"attn": "joint", "attn2": "self"}, ("image", "text"),
            notes="JointAttnProcessor2_0 calls F.sdpa directly; SD3.5 'dual attention' blocks add image-only attn2",
        ),
        DiTFamily(
            "cogvideox", "CogVideoXTransformer3DModel", {"attn1": "joint"}, ("text", "image"),
            latent_axes="BFCHW", patch=("patch_size_t", "patch_size", "patch_size"),
            notes="CogVideoXAttnProcessor2_0 calls F.sdpa directly; 1.5 patchifies time too (patch_size_t)",
        ),
        DiTFamily(
            "wan", "WanTransformer3DModel", {"attn1": "self", "attn2": "cross"},
            latent_axes="BCFHW", patch=("patch_size[0]", "patch_size[1]", "patch_size[2]"),
            notes="dispatch_attention_fn; video-only self-attention, text (and I2V image) through cross-attention",
        ),
        DiTFamily(
            "hunyuan_video", "HunyuanVideoTransformer3DModel",
            {"*token_refiner.*.attn": "text", "attn": "joint"}, ("image", "text"),
            latent_axes="BCFHW", patch=("patch_size_t", "patch_size", "patch_size"),
            notes="dispatch_attention_fn; [video; text] with the text padding mask; the text refiner stays dense",
        ),
        DiTFamily(
            "ltx_video", "LTXVideoTransformer3DModel", {"attn1": "self", "attn2": "cross"},
            latent_axes="args", patch=("patch_size_t", "patch_size", "patch_size"),
            grid_inputs=("num_frames", "height", "width"),
            notes="dispatch_attention_fn; packed video latent, grid from the num_frames/height/width arguments",
        ),
        DiTFamily(
            "pixart", "PixArtTransformer2DModel", {"attn1": "self", "attn2": "cross"},
            notes="AttnProcessor2_0 calls F.sdpa directly; cross-attention carries the caption padding mask",
        ),
    ]
}


def role_of(family: DiTFamily, qualified_name: str) -> str | None:
    """The role of the attention module ``qualified_name``: a matching glob first, else its attribute name."""
    for key, role in family.attention_roles.items():
        if "*" in key and fnmatch.fnmatchcase(qualified_name, key):
            return role
    return family.attention_roles.get(qualified_name.rsplit(".", 1)[-1])


def family_for_class(cls: type) -> DiTFamily | None:
    """The row for a transformer class or its nearest listed base class, or None."""
    for klass in cls.__mro__:
        if klass.__name__ in DIT_FAMILIES:
            return DIT_FAMILIES[klass.__name__]
    return None


def supported_dit_families() -> str:
    return ", ".join(f"{f.class_name} ({f.name})" for f in DIT_FAMILIES.values())
