"""The kernels that read FP8 (MODEL1) key caches in sparse_attn / hca_attn, for their CUDA
tests: ``DSV4_SPARSE_FP8=old`` (dequantisation between the GEMMs), ``=new`` (the
warp-specialised kernel), ``=new2`` (the same with the whole-sector producer mapping) and
``=auto`` (the default: old or new by the grid's size), read by the op at each call."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

needs_sm90 = pytest.mark.skipif(not torch.cuda.is_available() or
                                torch.cuda.get_device_capability() != (9, 0),
                                reason="FP8 caches need sm_90")

# Every value of DSV4_SPARSE_FP8; the first is the reference the others must equal bit for bit.
FP8_KERNELS = ("old", "new", "new2", "auto")


def both_fp8_kernels(check_kernel: Callable, a: dict, monkeypatch,
                     out_variants=(False, True)):
    """Runs ``check_kernel(a, out_variant)`` (the test file's check: fp32 reference, 2x bf16
    rule, poisoned outputs; returns (out, lse)) for every ``out_variants`` through every FP8
    kernel (FP8_KERNELS), and asserts they all agree with the old one bit for bit. Returns the
    new kernel's first (out, lse)."""
    res = {}
    for kernel in FP8_KERNELS:
        monkeypatch.setenv("DSV4_SPARSE_FP8", kernel)
        res[kernel] = [check_kernel(a, ov) for ov in out_variants]
    for kernel in FP8_KERNELS[1:]:
        for (o_old, l_old), (o_k, l_k) in zip(res["old"], res[kernel]):
            assert torch.equal(o_old, o_k) and torch.equal(l_old, l_k), kernel
    return res["new"][0]
