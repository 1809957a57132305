"""Why a method's row reads every key block: the config fields whose reach covers the whole text at its length.

Shared by ``patchattn demo`` and ``patchattn eval``, so a method that ran dense because the text was shorter than
its pattern (a window, a top-k budget, ``hyper``'s ``min_seq_len``) is named, never shown as a silent 1.0 density.
"""

from __future__ import annotations

from ..config import READS_EVERYTHING, covering_fields


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
