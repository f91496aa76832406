"""Independent work of a layer on a second CUDA stream (a side branch), joined before its result
is used: the scheduling of a step, never its maths (the same calls, the same values).

At decode size most kernels of a layer are latency-bound and use a few SMs; the ones that do
not depend on each other can run at the same time. A layer opens a :class:`Branch`, queues the
independent work inside ``with branch:`` (it runs on the device's side stream, after everything
queued before on the current stream), queues its own work after the block as usual, and calls
:meth:`Branch.join` before it reads what the branch produced. The layers that do (decode-size
steps, CUDA): the MoE runs its shared expert beside the gate, dispatch and routed experts; an
attention layer with compressed entries runs its compressor projections,
compressors and (CSA) indexer beside ``wq_b`` and the q / kv paths, a CSA layer's main
compressor handed back to the layer stream (below). The engines this follows: SGLang's
DeepSeek models run the shared experts on an alternate stream inside their CUDA graphs.

Memory: tensors the branch allocates live in the side stream's pool (each thread has its own
side stream). A branch always starts by waiting for the current stream, so a block the side
pool reuses was last read before the fork, and the current stream reads the branch's outputs
only after ``join``; inputs the branch reads must stay referenced until ``join`` (the layers
hold them as locals, and join in a ``finally``, so that an error between the fork and the join
leaves no side work unjoined). Branches are kept to steps of at most :data:`MAX_TOKENS`
tokens, so that the side pool stays small.

A branch may also hand part of its work to the current stream before the join:
:meth:`Branch.mark` records an event on the side stream inside the block, and
:meth:`Branch.wait` makes the current stream wait for that point only (a CSA layer's main
compressor runs on the current stream after the layer's own q / kv work, once the branch's
fused compressor projections are done, beside the indexer).

``DSV4_SIDE_STREAM`` (read at each branch): ``0`` runs every branch inline on the current
stream (the order of the work as written, as on the CPU); unset or ``1`` is the default.

Priorities: a branch is ``urgent`` (on the step's critical path, as an attention layer's
compressor / indexer chain) or not (the MoE's shared expert: ~20 us of GEMMs beside ~150 us of
gate, dispatch and routed experts). When both are ready at once, as after a fork in a replayed
CUDA graph, the GPU's block scheduler starts whichever kernel came first, so the shared
expert's GEMM could take every SM while the gate waits. With ``DSV4_STREAM_PRIORITY=1`` the
runtime captures its decode graphs on a high-priority stream (:func:`step_stream`), urgent
branches run on a side stream of the same priority and the others on a default-priority one;
a CUDA graph keeps each kernel's priority (PyTorch instantiates graphs with per-node
priorities), so the gate's blocks start before the shared expert's pending ones. ``0`` (the
default until measured): one side stream, every stream at the default priority.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch

from ..ops.backend import env_choice

__all__ = ["Branch", "MAX_TOKENS", "on_side_stream", "priorities_on", "step_stream"]

#: Steps with more tokens than this run their branches inline: at prefill size the kernels
#: fill the GPU on their own, and the side stream's pool would hold large intermediates.
MAX_TOKENS = 256

# Per thread: the side stream of each device, and the depth of branches entered. A thread's
# own side stream keeps the memory argument above within one thread's stream order (a block
# freed by one thread's work can only be reused by that thread's side stream).
_local = threading.local()


#: torch's priority of the high-priority streams (lower = higher; clamped to the device's).
HIGH_PRIORITY = -1


def priorities_on() -> bool:
    """Whether ``DSV4_STREAM_PRIORITY`` asks for stream priorities (module docstring)."""
    return env_choice("DSV4_STREAM_PRIORITY", ("0", "1", "")) == "1"


def _thread_stream(device: torch.device, key, priority: int) -> torch.cuda.Stream:
    """This thread's stream ``key`` of ``device`` (made once, at ``priority``)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    streams = getattr(_local, "streams", None)
    if streams is None:
        streams = _local.streams = {}
    if (index, key) not in streams:
        streams[index, key] = torch.cuda.Stream(device=index, priority=priority)
    return streams[index, key]


def _side_stream(device: torch.device, urgent: bool = True) -> torch.cuda.Stream:
    high = urgent and priorities_on()
    return _thread_stream(device, ("side", high), HIGH_PRIORITY if high else 0)


def step_stream(device: torch.device) -> Optional[torch.cuda.Stream]:
    """The stream a runtime captures its decode graphs on: a high-priority stream of this
    thread when priorities are on (None otherwise: the caller's own choice)."""
    return _thread_stream(device, "step", HIGH_PRIORITY) if priorities_on() else None


def on_side_stream() -> bool:
    """Whether the calling code runs inside a branch on the side stream (this thread)."""
    return getattr(_local, "depth", 0) > 0


class Branch:
    """``with branch:`` queues its body on the side stream of ``x``'s device when the branch
    is enabled (``x`` on CUDA, at most :data:`MAX_TOKENS` tokens = ``x.shape[0]``, ``enabled``,
    ``DSV4_SIDE_STREAM`` not ``0``, not already in a branch), else inline; :meth:`join` makes the
    current stream wait for it (a no-op inline). ``urgent``: the body is on the step's critical
    path (module docstring, priorities). Use once: enter, then join."""

    def __init__(self, x: torch.Tensor, enabled: bool = True, urgent: bool = True):
        switch = env_choice("DSV4_SIDE_STREAM", ("", "0", "1"))
        on = (enabled and switch != "0" and x.is_cuda and x.shape[0] <= MAX_TOKENS
              and not on_side_stream())
        self.stream: Optional[torch.cuda.Stream] = _side_stream(x.device, urgent) if on else None
        self._main: Optional[torch.cuda.Stream] = None
        self._ctx = None

    @property
    def active(self) -> bool:
        """Whether the body runs on the side stream."""
        return self.stream is not None

    def __enter__(self) -> "Branch":
        if self.stream is not None:
            self._main = torch.cuda.current_stream(self.stream.device)
            self.stream.wait_stream(self._main)
            self._ctx = torch.cuda.stream(self.stream)
            self._ctx.__enter__()
            _local.depth = getattr(_local, "depth", 0) + 1
        return self

    def __exit__(self, *exc) -> bool:
        if self._ctx is not None:
            _local.depth -= 1
            ctx, self._ctx = self._ctx, None
            ctx.__exit__(*exc)
            if exc[0] is not None:          # an error inside: leave no stream behind
                self.join()
        return False

    def mark(self) -> Optional[torch.cuda.Event]:
        """Inside ``with branch:``: an event recorded on the side stream after the work queued
        so far (None inline), for :meth:`wait`."""
        if self._ctx is None:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def wait(self, event: Optional[torch.cuda.Event]) -> None:
        """After the block, before :meth:`join`: the current stream waits for the branch's
        work up to ``event`` (from :meth:`mark`; None: nothing to wait for). What the branch
        produced before the mark may then be read on the current stream; it must stay
        referenced until the join, like every branch output (module docstring)."""
        if event is not None and self._main is not None:
            self._main.wait_event(event)

    def join(self) -> None:
        """The current stream waits for the branch's work (call after the block)."""
        if self._main is not None:
            self._main.wait_stream(self.stream)
            self._main = None
