"""Perturbed-attention guidance (PAG / HeadHunter's SoftPAG) with a transformer patched by ``softpag``.

The weak model is the same transformer with its chosen heads blended toward the identity map; guidance pushes the
prediction away from it: ``ε̂ = ε_c + w·(ε_c − ε_p)``, with classifier-free guidance ``ε̂ = ε_u + g·(ε_c − ε_u) +
w·(ε_c − ε_p)`` (diffusers' PAG pipelines combine them this way).  Three ways in, none a pipeline fork:

- ``guided_noise(cond, perturbed, w, uncond=, cfg_scale=)``: the formula, for a loop that already has the passes;
- ``SoftPAGGuidance(transformer, scale=w, cfg_scale=g)(inputs, uncond_inputs)``: runs the passes for a user loop;
- ``SoftPAGGuidance(...).attach(cfg_batch=...)``: a forward hook on the transformer, so an unmodified diffusers
  pipeline's denoising loop gets guided predictions.  Each transformer call runs one extra perturbed pass.  With
  ``cfg_batch=True`` the call is the pipeline's ``[uncond; cond]`` batch (SD3, PixArt, CogVideoX, ...): only the cond
  half is perturbed and it becomes ``ε_c + (w / g)·(ε_c − ε_p)``, so the pipeline's own CFG step yields the combined
  formula above (``g``: the pipeline's ``guidance_scale``).  With ``cfg_batch=False`` (FLUX's distilled guidance,
  or pipelines that call the transformer once per branch -- then attach only around the cond call) every call is
  guided as ``ε_c + w·(ε_c − ε_p)``.  ``handle.remove()`` detaches it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from ..state import PatchState

METHOD = "softpag"


def softpag_states(model: nn.Module) -> list[PatchState]:
    """The patch states of a ``softpag``-patched transformer (or pipeline); ValueError when there are none."""
    root = getattr(model, "transformer", model)
    states = [m.patchattn for m in root.modules()
              if isinstance(getattr(m, "patchattn", None), PatchState) and type(m.patchattn.config).method == METHOD]
    if not states:
        raise ValueError(f"{type(root).__name__} is not patched with softpag: call patchattn.patch(transformer, "
                         "'softpag', heads=[[layer, head], ...]) first")
    return states


@contextlib.contextmanager
def perturbation(model: nn.Module, on: bool = True):
    """Run the transformer's forwards inside as the weak model (softpag's chosen heads perturbed)."""
    states = softpag_states(model)
    before = [s.method_state.perturbing for s in states]
    for s in states:
        s.method_state.perturbing = on
    try:
        yield
    finally:
        for s, was in zip(states, before):
            s.method_state.perturbing = was


def set_perturbed_heads(model: nn.Module, heads) -> None:
    """Perturb exactly ``heads`` (``(layer, head)`` pairs; None: back to the config's) -- the head search's knob."""
    states = softpag_states(model)
    if heads is None:
        for s in states:
            s.method_state.heads = None
        return
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(int(layer), []).append(int(head))
    known = {s.layer_index for s in states}
    unknown = sorted(set(by_layer) - known)
    if unknown:
        raise ValueError(f"layers {unknown} are not attention modules of this transformer (it has {len(known)}: "
                         f"0..{len(known) - 1})")
    for s in states:
        s.method_state.heads = tuple(sorted(set(by_layer.get(s.layer_index, ()))))


def guided_noise(cond: torch.Tensor, perturbed: torch.Tensor, scale: float, *, uncond: torch.Tensor | None = None,
                 cfg_scale: float | None = None) -> torch.Tensor:
    """``cond + scale·(cond − perturbed)``, plus classifier-free guidance ``uncond + cfg_scale·(cond − uncond)`` in
    place of ``cond`` when ``uncond`` is given."""
    if (uncond is None) != (cfg_scale is None):
        raise ValueError("classifier-free guidance needs both uncond and cfg_scale (or neither)")
    base = cond if uncond is None else uncond + cfg_scale * (cond - uncond)
    return base + scale * (cond - perturbed)


def sample_of(output) -> torch.Tensor:
    """The noise prediction of a diffusers transformer's output (its ``sample``, or the tuple's first item)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output.sample


def _with_sample(output, sample: torch.Tensor):
    if isinstance(output, torch.Tensor):
        return sample
    if isinstance(output, tuple):
        return (sample, *output[1:])
    output["sample"] = sample  # diffusers' BaseOutput keeps its item and attribute in step
    return output


def _half(value, batch: int, which: int):
    """The ``which`` half (0 first, 1 second) of every tensor (nested in dicts) whose first dimension is ``batch``."""
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
        half = batch // 2
        return value[half:] if which else value[:half]
    if isinstance(value, dict):
        return {k: _half(v, batch, which) for k, v in value.items()}
    return value


@dataclass
class SoftPAGGuidance:
    """Guidance with a ``softpag``-patched transformer: ``scale`` is ``w`` (diffusers' PAG default 3.0), ``cfg_scale``
    the classifier-free guidance ``g`` (None: no CFG)."""

    model: nn.Module = field(repr=False)
    scale: float = 3.0
    cfg_scale: float | None = None
    _inside: bool = field(default=False, init=False, repr=False)

    def __post_init__(self):
        self.transformer = getattr(self.model, "transformer", self.model)
        softpag_states(self.transformer)  # refuse an unpatched model now, not at the first step

    def perturbed(self, inputs: dict) -> torch.Tensor:
        """The weak model's prediction for ``inputs`` (the transformer's keyword arguments)."""
        with perturbation(self.transformer):
            return sample_of(self.transformer(**inputs))

    def __call__(self, inputs: dict, uncond_inputs: dict | None = None) -> torch.Tensor:
        """The guided prediction of a user loop: cond and perturbed passes on ``inputs``, an uncond pass on
        ``uncond_inputs`` when CFG is on."""
        if (uncond_inputs is None) != (self.cfg_scale is None):
            raise ValueError("pass uncond_inputs exactly when cfg_scale is set")
        with perturbation(self.transformer, on=False):
            cond = sample_of(self.transformer(**inputs))
            uncond = None if uncond_inputs is None else sample_of(self.transformer(**uncond_inputs))
        return guided_noise(cond, self.perturbed(inputs), self.scale, uncond=uncond, cfg_scale=self.cfg_scale)

    # ---- inside an unmodified pipeline ---------------------------------------------------------------------------
    def attach(self, cfg_batch: bool = False):
        """Guide every call of the transformer through a forward hook (see the module docstring); returns the
        hook's handle (``.remove()``).  ``cfg_batch=True`` needs ``cfg_scale`` (the pipeline's guidance scale)."""
        if cfg_batch and not self.cfg_scale:
            raise ValueError("cfg_batch=True needs cfg_scale: the guidance_scale the pipeline applies (> 0)")

        def hook(module, args, kwargs, output):
            if self._inside:  # the perturbed pass's own call
                return output
            self._inside = True
            try:
                return self._guide_call(args, kwargs, output, cfg_batch)
            finally:
                self._inside = False

        return self.transformer.register_forward_hook(hook, with_kwargs=True)

    def _guide_call(self, args, kwargs, output, cfg_batch: bool):
        if args:
            raise ValueError("SoftPAGGuidance.attach: call the transformer with keyword arguments (diffusers "
                             "pipelines do)")
        sample = sample_of(output)
        if not cfg_batch:
            return _with_sample(output, guided_noise(sample, self.perturbed(kwargs), self.scale))
        batch = sample.shape[0]
        if batch % 2:
            raise ValueError(f"cfg_batch=True expects the [uncond; cond] batch of a CFG pipeline, got batch {batch}")
        cond = sample[batch // 2:]
        perturbed = self.perturbed({k: _half(v, batch, 1) for k, v in kwargs.items()})
        cond = guided_noise(cond, perturbed, self.scale / self.cfg_scale)
        return _with_sample(output, torch.cat([sample[: batch // 2], cond]))
