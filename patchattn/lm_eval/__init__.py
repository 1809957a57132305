"""lm-evaluation-harness integration: the ``patchattn`` model and a front end that registers it with our tasks.

    python -m patchattn.lm_eval --model patchattn --model_args pretrained=smollm2,method=hip \
        --tasks patchattn_passkey --limit 8

``PatchAttnLM`` (lm-eval model name ``patchattn``) is lm-eval's ``HFLM`` around a model loaded with
``patchattn.load`` and patched with ``method`` / ``method_args``.  An already patched model also works through
lm-eval's own ``HFLM(pretrained=model)``.  lm-eval is the optional ``eval`` extra.
"""

from __future__ import annotations

INSTALL_HINT = "pip install 'patchattn[eval]'"


def require_lm_eval():
    """The ``lm_eval`` module; ImportError with the one-line install hint when the extra is missing."""
    try:
        import lm_eval  # the optional eval extra: this is the check
    except ImportError:
        raise ImportError(f"lm-evaluation-harness is not installed; install the eval extra: {INSTALL_HINT}") from None
    return lm_eval


def __getattr__(name: str):
    # Lazy, so `import patchattn.lm_eval` works (and can say what to install) without lm-eval.
    if name in ("PatchAttnLM", "DensityMeter"):
        require_lm_eval()
        from . import model  # imports lm-eval, so only on first use

        return getattr(model, name)
    raise AttributeError(name)
