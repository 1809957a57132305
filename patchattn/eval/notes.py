"""Why a method's row reads every key block: the config fields whose reach covers the whole text at its length.

Shared by ``patchattn demo`` and ``patchattn eval``, so a method that ran dense because the text was shorter than
its pattern (a window, a top-k budget, ``hyper``'s ``min_seq_len``) is named, never shown as a silent 1.0 density.
"""

from __future__ import annotations

READS_EVERYTHING = 0.999  # density at or above this: every causally allowed block was read


def _field_tokens(name: str, value, block_size: int | None) -> int | None:
    """How many tokens an integer config field spans: ``*_blocks`` and ``top_k`` count blocks, ``*len*``,
    ``window`` and ``*_tokens`` count tokens; other fields (strides, seeds, sample sizes) span nothing."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    if (name.endswith("_blocks") or name == "top_k") and block_size:
        return value * block_size
    if "len" in name or "window" in name or name.endswith("_tokens"):
        return value
    return None


def covering_fields(config, tokens: int) -> list[tuple[str, int]]:
    """The config fields that reach the whole text at ``tokens`` tokens: (``name=value: help``, tokens spanned)."""
    block_size = getattr(config, "block_size", None)
    out = []
    for name, value, help_text in config.describe_fields():
        value = getattr(config, name, value)
        span = _field_tokens(name, value, block_size)
        if span is not None and span >= tokens:
            shown = f"{name}={value}" + (f" = {span} tokens" if span != value else "")
            out.append((f"{shown}: {help_text}", span))
    return out


def reads_everything(category: str, density: float | None) -> bool:
    """A sparse method that read every block: it ran dense."""
    return category == "sparse" and density is not None and density >= READS_EVERYTHING


def dense_note(config, tokens: int, length_flag: str = "--tokens") -> str:
    """The note for a sparse method that ran dense at ``tokens`` tokens, naming the fields that make it so."""
    fields = covering_fields(config, tokens)
    if not fields:
        return f"reads every block at {tokens} tokens, so it runs dense here (its selection kept every block)"
    why = "; ".join(text for text, _ in fields)
    return (f"reads every block at {tokens} tokens, so it runs dense here ({why}); it is sparse on longer "
            f"texts ({length_flag} above {max(span for _, span in fields)})")
