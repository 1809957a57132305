"""Output allocation shared by the Triton paths.

Tests run with ``KernelOptions(poison_outputs=True)`` so every buffer a kernel must fill starts as NaN: an element
a kernel forgets to write then fails the check instead of silently holding whatever the allocator handed back.
"""
import threading

import torch


def empty(shape, dtype, device, poison: bool = False) -> torch.Tensor:
    """An uninitialised buffer; NaN-filled (ints: -1) with ``poison`` (``KernelOptions.poison_outputs``)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if poison:
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


# Zeroed int32 arrival counters for kernels whose last program finishes the job ("last block done": the decode
# merge); each kernel resets the counters it used, so they stay zero between launches and
# CUDA-graph replays.  One list of buffers per (device, owner kernel): two such kernels never share a counter.
_COUNTERS: dict = {}
_MIN_COUNTERS = 1024


def counters(n: int, device, owner: str) -> torch.Tensor:
    """At least ``n`` zeroed int32 counters for ``owner`` on ``device``.

    Allocated and zeroed once (a launch records no memset), grown when too small; a replaced buffer stays alive,
    since a captured graph may still use it.  During graph capture a cache too small is not grown (the buffer would
    live in the graph's private pool): a fresh zeroed buffer is captured instead (its memset replays with the graph).
    """
    device = torch.device(device)
    bufs = _COUNTERS.setdefault((device, owner), [])
    if bufs and bufs[-1].numel() >= n:
        return bufs[-1]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(n, dtype=torch.int32, device=device)
    bufs.append(lasting_zeros(max(n, _MIN_COUNTERS, 2 * bufs[-1].numel() if bufs else 0), torch.int32, device))
    return bufs[-1]


_SPARE: dict = {}


def spare(device) -> torch.Tensor:
    """A small fp32 buffer on ``device`` passed for pointers a launch never dereferences (one per device, made
    outside any graph capture where possible)."""
    device = torch.device(device)
    buf = _SPARE.get(device)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return torch.zeros(1, dtype=torch.float32, device=device)
        buf = _SPARE[device] = lasting_zeros(1, torch.float32, device)
    return buf


def lasting_zeros(n: int, dtype, device: torch.device) -> torch.Tensor:
    """Zeros kept beyond the call (a module-level cache), made where no CUDA graph's private memory pool takes them.

    torch.compile's CUDA graphs ("reduce-overhead", transformers' compiled static-cache decode) run each graph once
    un-captured before recording it, with every allocation *of the current thread* routed to the graph's private
    pool (``_cuda_beginAllocateCurrentThreadToPool``); a cache filled then would hold a tensor of that pool which no
    graph outputs, and the graphs refuse it ("Detected 2 tensor(s) in the cudagraph pool not tracked as outputs").
    So CUDA buffers are made by a short-lived helper thread, on its own stream, and the current stream waits for
    them.  (A side stream on this thread is not enough: the routing is per thread, not per stream.)"""
    if device.type != "cuda":
        return torch.zeros(n, dtype=dtype, device=device)
    made: dict = {}

    def make() -> None:
        try:
            with torch.cuda.device(device):
                stream = torch.cuda.Stream(device)
                with torch.cuda.stream(stream):
                    made["buf"] = torch.zeros(n, dtype=dtype, device=device)
                    made["ready"] = torch.cuda.Event()
                    made["ready"].record(stream)
        except BaseException as error:  # re-raised on the calling thread
            made["error"] = error

    helper = threading.Thread(target=make, name="patchattn-lasting-zeros")
    helper.start()
    helper.join()
    if "error" in made:
        raise made["error"]
    torch.cuda.current_stream(device).wait_event(made["ready"])
    return made["buf"]
