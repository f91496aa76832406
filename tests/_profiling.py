"""Which CUDA kernels a call launches, for the CUDA tests that check a dispatch rule (which
kernel an op picks for a shape or an environment switch)."""

from __future__ import annotations

from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def cuda_kernel_names(fn: Callable[[], object], *contains: str) -> list[str]:
    """The names of the device activities ``fn()`` launches whose name contains every string
    of ``contains``, one per kind (torch.profiler's averages); the device is synchronised
    before and after the call. [] when the profiler records no CUDA activity here (no CUPTI):
    callers skip then."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.key for e in prof.key_averages() if all(s in e.key for s in contains)]
