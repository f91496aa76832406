"""Bad buffers given to the CUDA ops' glue (csrc/torch) raise a clear error instead of a crash or
a silently wrong result: a broadcast (expanded) out / lse given to sparse_attn_out and
grouped_oproj_out (every token would write one memory location), a broadcast bf16 entries
store given to compress_kv, and an o with head_dim 0 given to grouped_oproj (an integer
division by zero in the glue: the process died). The CPU references refuse the same inputs
(tests/ops/test_op_input_checks.py, test_grouped_oproj.py)."""

from __future__ import annotations

import pytest
import torch

import dsv4.ops  # noqa: F401  (registers every op)
from dsv4.layers.rope import rope_frequencies
from dsv4.ops import _ext

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not all(_ext.has_compiled_kernel(op) for op in
                                         ("sparse_attn", "grouped_oproj", "compress_kv")),
                                 reason="needs the compiled extension's kernels")]


def _bcast(shape, dtype, fill=7.0):
    """A broadcast view of `shape` (every element one memory location) holding `fill`."""
    return torch.full((1,) * len(shape), fill, dtype=dtype, device="cuda").expand(shape)


@pytest.mark.parametrize("which", ["out", "lse"])
def test_sparse_attn_out_refuses_broadcast_buffers(which):
    T, H, D, N = 4, 64, 512, 96
    q = torch.randn(T, H, D, device="cuda").bfloat16()
    kv = torch.randn(N, D, device="cuda").bfloat16()
    idx = torch.randint(0, N, (T, 64), dtype=torch.int32, device="cuda")
    sink = torch.randn(H, device="cuda")
    bufs = {"out": torch.full((T, H, D), 3.0, dtype=torch.bfloat16, device="cuda"),
            "lse": torch.full((T, H), 3.0, device="cuda")}
    bufs[which] = _bcast(bufs[which].shape, bufs[which].dtype)
    other = "lse" if which == "out" else "out"
    with pytest.raises(RuntimeError, match="must not be broadcast"):
        torch.ops.dsv4.sparse_attn_out(q, kv, idx, sink, 0.05, **bufs)
    torch.cuda.synchronize()
    assert bool((bufs[other] == 3).all()) and bool((bufs[which] == 7).all())  # nothing written
    # the same call with buffers of their own works
    out = torch.empty(T, H, D, dtype=torch.bfloat16, device="cuda")
    lse = torch.empty(T, H, device="cuda")
    torch.ops.dsv4.sparse_attn_out(q, kv, idx, sink, 0.05, out=out, lse=lse)
    ref_out, ref_lse = torch.ops.dsv4.sparse_attn(q, kv, idx, sink, 0.05)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


def _oproj_inputs(hd=128):
    T, H, G, R = 3, 4, 2, 128
    o = torch.randn(T, H, hd, device="cuda").bfloat16()
    pos = torch.arange(T, device="cuda")
    freqs = rope_frequencies(64, 10000.0).cuda()
    wo_a = (torch.randn(G, R, H * max(hd, 1) // G, device="cuda") * 0.05).bfloat16()
    return o, pos, freqs, wo_a, (T, G, R)


def test_grouped_oproj_refuses_head_dim_zero():
    o, pos, freqs, wo_a, _ = _oproj_inputs()
    with pytest.raises(RuntimeError, match="head_dim must be >= 1"):
        torch.ops.dsv4.grouped_oproj(o[..., :0], pos, freqs, wo_a, None)


def test_grouped_oproj_out_refuses_a_broadcast_out():
    o, pos, freqs, wo_a, shape = _oproj_inputs()
    out = _bcast(shape, torch.bfloat16)
    with pytest.raises(RuntimeError, match="must not be a broadcast"):
        torch.ops.dsv4.grouped_oproj_out(o, pos, freqs, wo_a, None, out=out)
    torch.cuda.synchronize()
    assert bool((out == 7).all())


def test_compress_kv_refuses_broadcast_entries():
    # test_op_input_checks.py's CPU case on CUDA: ratio 4 (overlapping windows, state width
    # 2 x 64), two rows of 4 new tokens each (one entry completes per row), bf16 entries
    # [rows, 4, 64] broadcast over rows and entries
    torch.manual_seed(0)
    kv, score = torch.randn(8, 128, device="cuda"), torch.randn(8, 128, device="cuda")
    args = (kv, score, torch.randn(4, 128, device="cuda"), torch.ones(64, device="cuda"),
            torch.rand(16, device="cuda"),
            torch.tensor([0, 4, 8], dtype=torch.int32, device="cuda"),
            torch.zeros(2, dtype=torch.int32, device="cuda"))
    state_kv = torch.zeros(2, 8, 128, device="cuda")
    state_score = torch.full((2, 8, 128), float("-inf"), device="cuda")
    entries = _bcast((2, 4, 64), torch.bfloat16)
    with pytest.raises(RuntimeError, match="broadcast"):
        torch.ops.dsv4.compress_kv(*args, state_kv, state_score, entries, 4, 4, 1e-6, 0)
    torch.cuda.synchronize()
    assert bool((state_kv == 0).all()) and bool((entries == 7).all())
    # entries of their own: the call runs and writes each row's first entry
    own = torch.zeros(2, 4, 64, dtype=torch.bfloat16, device="cuda")
    torch.ops.dsv4.compress_kv(*args, state_kv, state_score, own, 4, 4, 1e-6, 0)
    assert bool((own[:, 0] != 0).any(dim=-1).all())
