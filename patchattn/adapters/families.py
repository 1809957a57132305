"""What we know about each supported transformers model family, as data.

Adding a family is a row here plus a tiny config in ``patchattn/models.py``; no per-model forward is written
anywhere, because every family reaches its attention through transformers' ``AttentionInterface``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HFFamily:
    """One transformers model family.

    Attributes:
        model_type: ``config.model_type`` of the top-level model.
        kind: ``"llm"`` or ``"lvlm"``.
        text_config: attribute of the top config holding the language backbone's config (LVLMs).
        vision_config: attribute of the top config holding the vision tower's config (LVLMs).
        media_token_attrs: config attributes whose token ids mark image / video tokens in the text sequence.
        notes: what is special about the family (shown in the support matrix).
    """

    model_type: str
    kind: str
    text_config: str | None = None
    vision_config: str | None = None
    media_token_attrs: tuple[str, ...] = ()
    notes: str = ""


HF_FAMILIES: dict[str, HFFamily] = {
    f.model_type: f
    for f in [
        HFFamily("llama", "llm", notes="Llama 2/3, SmolLM2, TinyLlama, ..."),
        HFFamily("mistral", "llm", notes="optional sliding window in the mask"),
        HFFamily("qwen2", "llm", notes="q/k/v biases"),
        HFFamily("qwen3", "llm", notes="q/k RMSNorm before RoPE (kept: we hook after the projections)"),
        HFFamily("gemma2", "llm", notes="logit soft-capping (eager maths), alternating sliding-window layers"),
        HFFamily("gemma3_text", "llm", notes="5 of 6 layers sliding-window, q/k norms, dual RoPE"),
        HFFamily("phi3", "llm", notes="fused qkv projection"),
        HFFamily("llava", "lvlm", "text_config", "vision_config", ("image_token_id",), "CLIP vision tower"),
        HFFamily(
            "qwen2_vl", "lvlm", "text_config", "vision_config", ("image_token_id", "video_token_id"),
            "M-RoPE text backbone; vision tower attends per image (cu_seqlens)",
        ),
        HFFamily(
            "qwen2_5_vl", "lvlm", "text_config", "vision_config", ("image_token_id", "video_token_id"),
            "windowed vision attention with full-attention blocks",
        ),
        HFFamily(
            "gemma3", "lvlm", "text_config", "vision_config", ("image_token_id",),
            "SigLIP vision tower; bidirectional attention among image tokens in the text mask",
        ),
        HFFamily(
            "idefics3", "lvlm", "text_config", "vision_config", ("image_token_id",),
            "SigLIP vision tower, pixel-shuffle connector (scale_factor^2 patches per token), image splitting",
        ),
        HFFamily(
            "smolvlm", "lvlm", "text_config", "vision_config", ("image_token_id",),
            "SmolVLM: the Idefics3 design with a SmolLM2 backbone",
        ),
    ]
}

TARGETS = ("text", "vision", "all")


def supported_hf_families() -> str:
    return ", ".join(HF_FAMILIES)
