"""Input checks shared by every adapter: bad input gets a clear error instead of silent garbage.

Non-finite queries/keys/values at prefill raise a ``ValueError`` naming the method, the layer and the tensor; set
``PATCHATTN_CHECKS=0`` to skip the check.  Decode steps (one query) are never checked.

A model patched by ``patchattn.patch`` reads the check once per model forward, not once per layer: each prefill
attention call only computes a device flag (``finite_flags``: no host read) and queues it in the shared
``PatchContext``; hooks on the patched root model (``InputCheckHooks``) open a queue when the forward starts and
read every flag of it in one host read when it ends, before the output is returned.  A host read in every layer
would stop the host from queueing the next layers' kernels (on a GPU a short prefill would cost host time plus
device time).  Calls with no open queue -- a model loaded with ``attn_implementation="patchattn_<m>"`` before
``get_handle``, a submodule called on its own, a call inside ``torch.compile`` -- check at once, as before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

TENSORS = ("query", "key", "value")
PENDING_KEY = "input_checks"  # PatchContext.extras: a stack of open queues, one per root forward in progress
CHECKS_OFF = ()  # the queue of a forward that began with PATCHATTN_CHECKS=0: nothing is checked nor queued


def checks_enabled() -> bool:
    return os.environ.get("PATCHATTN_CHECKS", "1") != "0"


@dataclass
class _Queued:
    """One attention call's flags (bool ``[3]``: query, key, value finite) and what its error names."""

    flags: torch.Tensor
    method: str
    state: object  # the module's PatchState (its layer is named only when the error is raised), or None
    shapes: tuple


def check_inputs(method: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, state=None) -> None:
    """ValueError for non-finite queries/keys/values at prefill, or for shapes no method can handle.

    With ``state`` (the module's ``PatchState``) the error names its layer, and the finiteness is read at the end of
    the model's forward when the patch's hooks opened a queue for it (one host read per forward; the hooks read
    ``PATCHATTN_CHECKS`` once then, not every layer)."""
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        raise ValueError(
            f"{method}: query/key/value must be [batch, heads, tokens, head_dim]; got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if query.shape[1] % key.shape[1] != 0:
        raise ValueError(
            f"{method}: query heads ({query.shape[1]}) must be a multiple of key/value heads ({key.shape[1]})"
        )
    if query.shape[2] <= 1:  # a decode step: never checked
        return
    pending = _open_queue(state)
    if pending is CHECKS_OFF:
        return
    if pending is None and not checks_enabled():
        return
    tensors = (query, key, value)
    queued = _Queued(finite_flags(tensors), method, state, (tuple(query.shape), tuple(key.shape), tuple(value.shape)))
    if pending is not None:
        pending.append(queued)  # read by InputCheckHooks.end when the model's forward returns
    else:
        raise_if_not_finite([queued])


def finite_flags(tensors) -> torch.Tensor:
    """Bool ``[len(tensors)]`` on the device, no host read: each tensor's min and max are finite.

    One reduction per tensor (``aminmax`` propagates NaN, and +-Inf is its own min or max -- both ends are kept, so
    a -Inf is not hidden behind a finite max nor a +Inf behind a finite min) instead of a full-size ``isfinite``
    mask; min/max cannot overflow as a sum would.  The ends of all the tensors are then tested in 3 small ops:
    ``x * 0`` is 0 for a finite ``x`` and NaN for NaN or +-Inf, and a sum with a NaN is NaN, so a tensor is finite
    exactly when the sum of its two ends times 0 equals 0 (``isfinite`` is 4 ops of its own, twice per tensor)."""
    ends = []
    for t in tensors:
        if t.numel() == 0:  # nothing to check (aminmax refuses an empty tensor)
            ends += [torch.zeros((), dtype=t.dtype, device=t.device)] * 2
        else:
            ends += torch.aminmax(t)
    return torch.stack(ends).view(-1, 2).mul(0).sum(dim=1).eq(0)

def raise_if_not_finite(queued: list[_Queued]) -> None:
    """One host read for all the queued calls' flags; ValueError naming the first call and tensor not finite."""
    if not queued:
        return
    device = queued[0].flags.device
    finite = torch.stack([q.flags.to(device, non_blocking=True) for q in queued]).tolist()
    for q, row in zip(queued, finite):
        for name, shape, ok in zip(TENSORS, q.shapes, row):
            if not ok:
                raise ValueError(
                    f"{q.method}: the attention {name} of {_where(q.state)} contains NaN or Inf (shape {shape}); check the "
                    "model inputs and dtype (fp16 overflow?). Set PATCHATTN_CHECKS=0 to skip this check."
                )


def _where(state) -> str:
    if state is None:
        return "an attention layer"
    role = "" if getattr(state, "role", "text") == "text" else f"{state.role} "
    return f"{role}layer {state.layer_index}"


def _open_queue(state) -> list | tuple | None:
    """The innermost queue the root model's hooks opened for this forward (``CHECKS_OFF`` when the checks were off
    as it began), or None (check at once)."""
    if state is None or torch.compiler.is_compiling():  # a compiled graph keeps today's behaviour (no queue)
        return None
    stack = state.context.extras.get(PENDING_KEY)
    return stack[-1] if stack else None


@dataclass
class InputCheckHooks:
    """Forward pre-hook and forward hook of a patched root model: one host read of the input checks per forward.

    ``start`` opens a queue on the context's stack, ``end`` closes it (registered with ``always_call=True``, so a
    forward that raises closes its queue too, and no flag leaks into the next forward) and reads its flags once.
    Both are registered first among the model's hooks (``prepend``), so no other hook can raise between them.  A
    class rather than a closure, so a patched model can be deep-copied and pickled."""

    context: object

    def start(self, _module, _args) -> None:
        if torch.compiler.is_compiling():
            return
        self.context.extras.setdefault(PENDING_KEY, []).append([] if checks_enabled() else CHECKS_OFF)

    def end(self, _module, _args, output) -> None:
        if torch.compiler.is_compiling():
            return
        stack = self.context.extras.get(PENDING_KEY)
        queued = stack.pop() if stack else []
        if output is not None:  # None: the forward raised, and that error goes on (torch silences ours anyway)
            raise_if_not_finite(queued)

    def register(self, model) -> list:
        """The two hook handles (``patch.hooks``: removed by ``unpatch``)."""
        return [model.register_forward_pre_hook(self.start, prepend=True),
                model.register_forward_hook(self.end, prepend=True, always_call=True)]
