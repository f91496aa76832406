"""torch.ops.dsv4.compress_kv: the reference against Compressor.forward (CPU, bit for bit), call
schedules (one shot / token by token / odd chunks, kernels.md §5 #11), the CUDA kernel against
the reference (GPU), CUDA-graph capture, and torch.library.opcheck."""

from __future__ import annotations

import pytest
import torch

import dsv4.ops  # noqa: F401  (registers every op)
import dsv4.ops._ext as ext
from dsv4.cache import CompressorState
from dsv4.config import ModelConfig
from dsv4.layers.compressor import Compressor
from dsv4.layers.rope import rope_frequencies
from dsv4.ops.compressor import (QUANT_FP4_HADAMARD, QUANT_FP8, QUANT_NONE, compress_kv,
                                 compress_kv_reference)

EPS = 1e-6
ROPE_DIM = 64
LENS = [1, 3, 0, 4, 5, 127, 128, 129]   # kernels.md §5 #11, plus a zero-length row
CHUNKS = (3, 5, 2, 7, 1, 130, 6)        # odd split points (not multiples of 4 or 128)


def _freqs() -> torch.Tensor:
    # The CSA/HCA table (YaRN), as the model builds it.
    return rope_frequencies(ROPE_DIM, 160000.0, 65536, 16.0, 32.0, 1.0)


def _schedule(kind: str, lens: list[int]) -> list[list[int]]:
    """calls[k][b] = tokens row b receives in call k."""
    if kind == "one_shot":
        return [list(lens)]
    if kind == "token_by_token":
        return [[1 if k < n else 0 for n in lens] for k in range(max(lens))]
    done = [0] * len(lens)
    calls = []
    k = 0
    while any(d < n for d, n in zip(done, lens)):
        call = [min(CHUNKS[(k + b) % len(CHUNKS)], n - d) for b, (d, n) in
                enumerate(zip(done, lens))]
        done = [d + c for d, c in zip(done, call)]
        calls.append(call)
        k += 1
    return calls


def _layout(call: list[int], done: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    cu = [0]
    for n in call:
        cu.append(cu[-1] + n)
    return (torch.tensor(cu, dtype=torch.int32, device=device),
            torch.tensor(done, dtype=torch.int32, device=device))


def _bf16_ulp_tol(ref: torch.Tensor) -> torch.Tensor:
    """~2 bf16 ulps of each element plus 2^-8 of its entry's rms (RoPE dims cancel)."""
    r = ref.float()
    rms = r.square().mean(-1, keepdim=True).sqrt()
    return r.abs() * 2.0 ** -6 + rms * 2.0 ** -8


def assert_entries_match(got: torch.Tensor, ref: torch.Tensor, quant: int) -> None:
    """The rounding rule of this op: entries [..., d] of the same dtype agree within ~2 bf16
    ulps (one extra rounding step where an fp32 last-bit difference flips a cast); with the
    quantisation simulation such a flip can also move a value one FP8 / FP4 step: at least
    99% of the elements must match within the tight bound and the rest within one step.
    NaN (unwritten) positions must coincide."""
    assert got.shape == ref.shape and got.dtype == ref.dtype
    nan_g, nan_r = got.isnan(), ref.isnan()
    assert torch.equal(nan_g, nan_r), "written / unwritten entries differ"
    g, r = got.float()[~nan_r.all(-1)], ref.float()[~nan_r.all(-1)]
    if g.numel() == 0:
        return
    err = (g - r).abs()
    if ref.dtype == torch.float32:
        rms = r.square().mean(-1, keepdim=True).sqrt()
        tight = r.abs() * 1e-5 + rms * 1e-6
    else:
        tight = _bf16_ulp_tol(r)
    ok = err <= tight
    if quant == QUANT_NONE:
        assert bool(ok.all()), f"max err {err.max().item()} (tolerance rule, no quant)"
        return
    d = r.shape[-1]
    if quant == QUANT_FP8:
        amax = r[..., :d - ROPE_DIM].unflatten(-1, (-1, 64)).abs().amax(-1, keepdim=True)
        step_scale = (amax.clamp_min(1e-4) / 448 * 2).expand(*amax.shape[:-1], 64).flatten(-2)
        one_step = torch.cat([g.abs().maximum(r.abs())[..., :d - ROPE_DIM] * 2.0 ** -3
                              + step_scale * 2.0 ** -9, torch.zeros_like(r[..., d - ROPE_DIM:])],
                             -1)
    else:
        amax = r.unflatten(-1, (-1, 32)).abs().amax(-1, keepdim=True)
        one_step = (amax * 0.7).expand(*amax.shape[:-1], 32).flatten(-2)
    loose = err <= tight + one_step
    assert bool(loose.all()), f"max err {err.max().item()} beyond one quantisation step"
    frac = ok.float().mean().item()
    assert frac >= 0.99, f"only {frac:.4f} of the elements match tightly"


# ---------------------------------------------------------------------------------------------
# CPU: the reference is Compressor.forward, batched
# ---------------------------------------------------------------------------------------------
def _module_and_inputs(d: int, m: int, rotate: bool, quant_sim: bool, lens: list[int], seed: int):
    torch.manual_seed(seed)
    cfg = ModelConfig.tiny(quant_sim=quant_sim)
    comp = Compressor(cfg, m, d, rotate=rotate)
    with torch.no_grad():
        comp.norm.weight.uniform_(0.5, 1.5)   # a kernel ignoring the weight is visibly wrong
        comp.ape.mul_(5.0)                    # ape matters for the gate
    xs = [torch.randn(n, cfg.dim) for n in lens]
    quant = QUANT_NONE if not quant_sim else (QUANT_FP4_HADAMARD if rotate else QUANT_FP8)
    return cfg, comp, xs, quant


def _run_module(comp, xs, lens, schedule, dtype) -> CompressorState:
    st = CompressorState(len(lens), comp.compress_ratio, comp.head_dim, dtype, "cpu")
    done = [0] * len(lens)
    with torch.no_grad():
        for call in schedule:
            for b, n in enumerate(call):
                if n:
                    comp(xs[b][done[b]:done[b] + n], st, b, done[b], _freqs())
            done = [d + n for d, n in zip(done, call)]
    return st


def _run_op(comp, xs, lens, schedule, dtype, capacity, quant,
            whole_rows: bool = False) -> CompressorState:
    """Feed the tokens through the op. The projections are computed per row chunk, exactly as
    Compressor.forward computes them, or (``whole_rows``) once per row and sliced, so that
    every schedule sees bitwise the same kv / score (a GEMM's last bits depend on its M)."""
    st = CompressorState(len(lens), comp.compress_ratio, comp.head_dim, dtype, "cpu")
    st.reserve(capacity)
    done = [0] * len(lens)
    with torch.no_grad():
        kv_rows = [comp.wkv(x.float()) for x in xs]
        sc_rows = [comp.wgate(x.float()) for x in xs]
        for call in schedule:
            if whole_rows:
                kv = torch.cat([kv_rows[b][done[b]:done[b] + n] for b, n in enumerate(call)])
                sc = torch.cat([sc_rows[b][done[b]:done[b] + n] for b, n in enumerate(call)])
            else:
                kv = torch.cat([comp.wkv(xs[b][done[b]:done[b] + n].float()) for b, n in
                                enumerate(call)])
                sc = torch.cat([comp.wgate(xs[b][done[b]:done[b] + n].float()) for b, n in
                                enumerate(call)])
            cu, starts = _layout(call, done, "cpu")
            torch.ops.dsv4.compress_kv(kv, sc, comp.ape, comp.norm.weight, _freqs(), cu, starts,
                                       st.kv, st.score, st.entries, comp.compress_ratio,
                                       max(call), comp.config.norm_eps, quant)
            done = [d + n for d, n in zip(done, call)]
    return st


MODULE_CASES = [
    # (head_dim, ratio, rotate, quant_sim, entry dtype)
    (128, 4, False, True, torch.bfloat16),    # tiny CSA main KV, FP8
    (64, 4, True, True, torch.bfloat16),      # tiny indexer keys, Hadamard + FP4
    (128, 16, False, True, torch.bfloat16),   # tiny HCA
    (512, 4, False, True, torch.bfloat16),    # real CSA main KV
    (128, 4, True, True, torch.bfloat16),     # real indexer keys
    (128, 4, False, False, torch.float32),    # no quantisation, fp32 store
    (64, 8, False, False, torch.bfloat16),
]


@pytest.mark.parametrize("schedule", ["one_shot", "token_by_token", "chunks"])
@pytest.mark.parametrize("d,m,rotate,quant_sim,dtype", MODULE_CASES,
                         ids=[f"d{c[0]}-r{c[1]}-{'rot' if c[2] else 'main'}-"
                              f"{'q' if c[3] else 'noq'}-{str(c[4])[6:]}" for c in MODULE_CASES])
def test_reference_equals_compressor_forward(d, m, rotate, quant_sim, dtype, schedule):
    lens = LENS if schedule != "token_by_token" or d < 512 else [1, 4, 0, 9]
    _, comp, xs, quant = _module_and_inputs(d, m, rotate, quant_sim, lens, seed=d * m)
    sched = _schedule(schedule, lens)
    ref = _run_module(comp, xs, lens, sched, dtype)
    n_entries = [n // m for n in lens]
    got = _run_op(comp, xs, lens, sched, dtype, max(max(n_entries), 1), quant)
    assert torch.equal(got.kv, ref.kv) and torch.equal(got.score, ref.score)
    for b, ne in enumerate(n_entries):
        assert torch.equal(got.entries[b, :ne], ref.entries[b, :ne]), (b, ne)
        assert not bool(got.entries[b, ne:].any())   # nothing beyond the completed blocks


def test_reference_equals_compressor_forward_hca128():
    lens = [129, 0, 260, 127]
    _, comp, xs, quant = _module_and_inputs(512, 128, False, True, lens, seed=7)
    for kind in ("one_shot", "chunks"):
        sched = _schedule(kind, lens)
        ref = _run_module(comp, xs, lens, sched, torch.bfloat16)
        got = _run_op(comp, xs, lens, sched, torch.bfloat16, 2, quant)
        assert torch.equal(got.kv, ref.kv) and torch.equal(got.score, ref.score)
        for b, n in enumerate(lens):
            assert torch.equal(got.entries[b, :n // 128], ref.entries[b, :n // 128])


def _meaningful_state_rows(state: torch.Tensor, m: int, length: int) -> torch.Tensor:
    """Rows of one batch row's state that a continuation reads (the others are stale)."""
    rem = length % m
    if m == 4:
        rows = ([0, 1, 2, 3] if length >= 4 else []) + [4 + k for k in range(rem)]
    else:
        rows = list(range(rem))
    return state[rows]


@pytest.mark.parametrize("d,m,rotate,quant_sim,dtype", MODULE_CASES[:3] + MODULE_CASES[5:6])
def test_reference_schedules_agree(d, m, rotate, quant_sim, dtype):
    """One shot == token by token == odd chunks (kernels.md §5 #11): entries within the
    rounding rule, the state rows a continuation reads bit for bit."""
    _, comp, xs, quant = _module_and_inputs(d, m, rotate, quant_sim, LENS, seed=3)
    cap = max(n // m for n in LENS)
    runs = {k: _run_op(comp, xs, LENS, _schedule(k, LENS), dtype, cap, quant, whole_rows=True)
            for k in ("one_shot", "token_by_token", "chunks")}
    base = runs["one_shot"]
    for kind in ("token_by_token", "chunks"):
        st = runs[kind]
        assert_entries_match(st.entries, base.entries, quant)
        for b, n in enumerate(LENS):
            for t in ("kv", "score"):
                assert torch.equal(_meaningful_state_rows(getattr(st, t)[b], m, n),
                                   _meaningful_state_rows(getattr(base, t)[b], m, n)), (kind, b)


def _random_problem(d, m, B, T, device, seed, dtype=torch.bfloat16, capacity=8):
    g = torch.Generator(device="cpu").manual_seed(seed)
    coff = 2 if m == 4 else 1
    w = coff * d

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    return dict(
        kv=rnd(T, w), score=rnd(T, w, scale=1.5), ape=rnd(m, w, scale=0.5),
        norm_weight=(torch.rand(d, generator=g) + 0.5).to(device), freqs=_freqs().to(device),
        state_kv=torch.zeros(B, coff * m, w, device=device),
        state_score=torch.full((B, coff * m, w), float("-inf"), device=device),
        entries=torch.zeros(B, capacity, d, dtype=dtype, device=device))


def _call(fn, p, cu, starts, m, max_seqlen, quant):
    fn(p["kv"], p["score"], p["ape"], p["norm_weight"], p["freqs"], cu, starts, p["state_kv"],
       p["state_score"], p["entries"], m, max_seqlen, EPS, quant)


def test_reference_zero_length_rows_and_capacity():
    """Rows without new tokens are untouched; entries j >= capacity are not written."""
    d, m = 128, 4
    p = _random_problem(d, m, 3, 30, "cpu", seed=11, capacity=5)
    p["state_kv"].normal_()
    before = {k: p[k].clone() for k in ("state_kv", "state_score", "entries")}
    cu = torch.tensor([0, 0, 30, 30], dtype=torch.int32)
    starts = torch.tensor([9, 2, 5], dtype=torch.int32)
    _call(torch.ops.dsv4.compress_kv, p, cu, starts, m, 30, QUANT_FP8)
    for k in before:  # rows 0 and 2 have no tokens
        assert torch.equal(p[k][0], before[k][0]) and torch.equal(p[k][2], before[k][2]), k
    # row 1: positions 2..31 complete blocks 0..7; only 0..4 fit
    full = _random_problem(d, m, 3, 30, "cpu", seed=11, capacity=8)
    full["state_kv"].copy_(before["state_kv"])
    _call(torch.ops.dsv4.compress_kv, full, cu, starts, m, 30, QUANT_FP8)
    assert torch.equal(p["entries"][1], full["entries"][1, :5])
    assert bool(full["entries"][1, 5:].ne(0).any())


def test_reference_rejects_bad_inputs():
    p = _random_problem(64, 4, 2, 6, "cpu", seed=1)
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    starts = torch.zeros(2, dtype=torch.int32)
    op = torch.ops.dsv4.compress_kv
    with pytest.raises((ValueError, RuntimeError), match="kv must be float32"):
        _call(op, {**p, "kv": p["kv"][:, :64]}, cu, starts, 4, 3, QUANT_NONE)
    with pytest.raises((ValueError, RuntimeError), match="ape must be float32"):
        _call(op, {**p, "ape": p["ape"][:3]}, cu, starts, 4, 3, QUANT_NONE)
    with pytest.raises((ValueError, RuntimeError), match="state_kv must be float32"):
        _call(op, {**p, "state_kv": p["state_kv"][:, :4]}, cu, starts, 4, 3, QUANT_NONE)
    with pytest.raises((ValueError, RuntimeError), match="cu_seqlens must be int32"):
        _call(op, p, cu.long(), starts, 4, 3, QUANT_NONE)
    with pytest.raises((ValueError, RuntimeError), match="quant must be"):
        _call(op, p, cu, starts, 4, 3, 3)
    _call(op, {k: v.clone() for k, v in p.items()}, cu, starts, 4, 3, QUANT_FP8)  # 64 - 64 ok
    with pytest.raises((ValueError, RuntimeError), match="multiple of 64"):
        _call(op, {**p, "freqs": p["freqs"][:16]}, cu, starts, 4, 3, QUANT_FP8)  # 64 - 32
    with pytest.raises((ValueError, RuntimeError), match="cu_seqlens"):
        _call(op, p, torch.tensor([0, 4, 3], dtype=torch.int32), starts, 4, 4, QUANT_NONE)
    with pytest.raises((ValueError, RuntimeError), match="starts >= 0"):
        _call(op, p, cu, torch.tensor([0, -1], dtype=torch.int32), 4, 3, QUANT_NONE)


def test_python_wrapper_matches_op():
    a = _random_problem(128, 16, 2, 40, "cpu", seed=5)
    b = {k: v.clone() for k, v in a.items()}
    cu = torch.tensor([0, 17, 40], dtype=torch.int32)
    starts = torch.tensor([3, 0], dtype=torch.int32)
    _call(compress_kv, a, cu, starts, 16, 23, QUANT_FP8)
    _call(compress_kv_reference, b, cu, starts, 16, 23, QUANT_FP8)
    for k in ("state_kv", "state_score", "entries"):
        assert torch.equal(a[k], b[k])
    assert bool(a["entries"][:, :1].ne(0).all(-1).any())


# ---------------------------------------------------------------------------------------------
# CUDA kernel vs the reference
# ---------------------------------------------------------------------------------------------
needs_kernel = pytest.mark.skipif(not ext.HAS_C, reason="dsv4._C not built")

CUDA_CASES = [
    # (head_dim, ratio, quant, entry dtype)
    (512, 4, QUANT_FP8, torch.bfloat16),            # V4 CSA main KV
    (128, 4, QUANT_FP4_HADAMARD, torch.bfloat16),   # V4 indexer keys
    (512, 128, QUANT_FP8, torch.bfloat16),          # V4 HCA
    (128, 16, QUANT_FP8, torch.bfloat16),           # tiny HCA
    (64, 4, QUANT_FP4_HADAMARD, torch.bfloat16),    # tiny indexer
    (128, 4, QUANT_NONE, torch.float32),
    (64, 8, QUANT_NONE, torch.bfloat16),
]


def _run_schedule(fn, p, lens, schedule, m, quant, start0, understate=False):
    """Feed the rows' tokens (p["kv"] rows grouped by row, lens[b] each) in `schedule`."""
    offs = [0]
    for n in lens:
        offs.append(offs[-1] + n)
    done = [0] * len(lens)
    dev = p["kv"].device
    for call in schedule:
        idx = torch.cat([torch.arange(offs[b] + done[b], offs[b] + done[b] + n)
                         for b, n in enumerate(call)]).to(dev)
        cu, starts = _layout(call, [s + d for s, d in zip(start0, done)], dev)
        q = {**p, "kv": p["kv"][idx].contiguous(), "score": p["score"][idx].contiguous()}
        max_seqlen = max(call) // 3 if understate else max(call)
        _call(fn, q, cu, starts, m, max_seqlen, quant)
        done = [d + n for d, n in zip(done, call)]


@pytest.mark.cuda
@needs_kernel
@pytest.mark.parametrize("schedule", ["one_shot", "token_by_token", "chunks"])
@pytest.mark.parametrize("d,m,quant,dtype", CUDA_CASES,
                         ids=[f"d{c[0]}-r{c[1]}-q{c[2]}-{str(c[3])[6:]}" for c in CUDA_CASES])
def test_cuda_matches_reference(d, m, quant, dtype, schedule):
    lens = LENS if m < 128 else [129, 0, 300, 127]
    capacity = max(n // m for n in lens) + 2
    kern = _random_problem(d, m, len(lens), sum(lens), "cuda", seed=d + m, dtype=dtype,
                           capacity=capacity)
    kern["entries"].fill_(float("nan"))                 # poison: unwritten entries stay NaN
    ref = {k: v.clone() for k, v in kern.items()}
    sched = _schedule(schedule, lens)
    _run_schedule(torch.ops.dsv4.compress_kv, kern, lens, sched, m, quant, [0] * len(lens))
    _run_schedule(compress_kv_reference, ref, lens, sched, m, quant, [0] * len(lens))
    torch.cuda.synchronize()
    assert torch.equal(kern["state_kv"], ref["state_kv"])
    assert torch.equal(kern["state_score"], ref["state_score"])
    assert_entries_match(kern["entries"], ref["entries"], quant)
    for b, n in enumerate(lens):                         # written exactly the completed blocks
        assert not bool(kern["entries"][b, :n // m].isnan().any())
        assert bool(kern["entries"][b, n // m:].isnan().all())


@pytest.mark.cuda
@needs_kernel
@pytest.mark.parametrize("d,m", [(512, 4), (512, 128), (128, 16)])
def test_cuda_flash_attention_tolerance_rule(d, m):
    """No quantisation, bf16 store: the kernel's error against the fp32-store reference is at
    most 2x the error of the bf16-store reference (plus a floor of 2^-9 of the largest value)."""
    lens = [257, 64, 131]
    p = _random_problem(d, m, 3, sum(lens), "cuda", seed=m, capacity=80)
    ref16 = {k: v.clone() for k, v in p.items()}
    ref32 = {**{k: v.clone() for k, v in p.items()}, "entries": p["entries"].float()}
    sched = _schedule("chunks", lens)
    _run_schedule(torch.ops.dsv4.compress_kv, p, lens, sched, m, QUANT_NONE, [0, 0, 0])
    _run_schedule(compress_kv_reference, ref16, lens, sched, m, QUANT_NONE, [0, 0, 0])
    _run_schedule(compress_kv_reference, ref32, lens, sched, m, QUANT_NONE, [0, 0, 0])
    e32 = ref32["entries"]
    err_kernel = (p["entries"].float() - e32).abs().max().item()
    err_ref = (ref16["entries"].float() - e32).abs().max().item()
    assert err_kernel <= 2 * err_ref + e32.abs().max().item() * 2.0 ** -9, (err_kernel, err_ref)
    cos = torch.nn.functional.cosine_similarity(p["entries"].float().flatten(), e32.flatten(),
                                                dim=0)
    assert cos.item() > 0.99999


@pytest.mark.cuda
@needs_kernel
@pytest.mark.parametrize("d,m,quant", [(512, 4, QUANT_FP8), (512, 128, QUANT_FP8),
                                       (128, 4, QUANT_FP4_HADAMARD)])
@pytest.mark.parametrize("understate", [False, True], ids=["max_seqlen", "max_seqlen/3"])
def test_cuda_continuation_and_max_seqlen(d, m, quant, understate):
    """A random existing state at nonzero (large) positions; max_seqlen only sizes the grid:
    rows longer than it are still complete."""
    lens = [37, 0, 9, 200]
    start0 = [13, 5, (1 << 16) + 3, 130]   # positions ~65K: RoPE angles up to ~6.5e4 rad
    cap = max((s + n) // m for s, n in zip(start0, lens)) + 1
    kern = _random_problem(d, m, 4, sum(lens), "cuda", seed=99, capacity=cap)
    kern["state_kv"].normal_()
    kern["state_score"].normal_()
    kern["entries"].fill_(float("nan"))
    ref = {k: v.clone() for k, v in kern.items()}
    sched = _schedule("chunks", lens)
    _run_schedule(torch.ops.dsv4.compress_kv, kern, lens, sched, m, quant, start0, understate)
    _run_schedule(compress_kv_reference, ref, lens, sched, m, quant, start0)
    assert torch.equal(kern["state_kv"], ref["state_kv"])
    assert torch.equal(kern["state_score"], ref["state_score"])
    assert_entries_match(kern["entries"], ref["entries"], quant)


@pytest.mark.cuda
@needs_kernel
def test_cuda_skips_inconsistent_rows_and_full_capacity():
    """Device data cannot raise: a row with starts < 0 is left untouched; entries at or beyond
    the capacity are not written."""
    d, m = 128, 4
    p = _random_problem(d, m, 3, 30, "cuda", seed=4, capacity=3)
    p["entries"].fill_(float("nan"))
    ref = {k: v.clone() for k, v in p.items()}
    cu = torch.tensor([0, 10, 20, 30], dtype=torch.int32, device="cuda")
    # row 0: invalid; row 1: positions 0..9 -> entries 0, 1; row 2: positions 8..17 ->
    # entries 2 and 3, and 3 >= capacity.
    starts = torch.tensor([-1, 0, 8], dtype=torch.int32, device="cuda")
    _call(torch.ops.dsv4.compress_kv, p, cu, starts, m, 10, QUANT_FP4_HADAMARD)
    for k in ("state_kv", "state_score"):
        assert torch.equal(p[k][0], ref[k][0]), k
    assert bool(p["entries"][0].isnan().all())
    assert not bool(p["entries"][1, :2].isnan().any()) and bool(p["entries"][1, 2].isnan().all())
    assert bool(p["entries"][2, :2].isnan().all()) and not bool(p["entries"][2, 2].isnan().any())
    # Rows 1 and 2 against the reference (row 0 given no tokens there).
    cu_ref = torch.tensor([0, 0, 10, 20], dtype=torch.int32, device="cuda")
    starts_ref = torch.tensor([0, 0, 8], dtype=torch.int32, device="cuda")
    _call(compress_kv_reference, {**ref, "kv": p["kv"][10:], "score": p["score"][10:]},
          cu_ref, starts_ref, m, 10, QUANT_FP4_HADAMARD)
    for k in ("state_kv", "state_score"):
        assert torch.equal(p[k][1:], ref[k][1:]), k
    assert_entries_match(p["entries"][1:], ref["entries"][1:], QUANT_FP4_HADAMARD)


@pytest.mark.cuda
@needs_kernel
@pytest.mark.parametrize("m,d", [(4, 512), (128, 512)])
def test_cuda_graph_capture_decode(m, d):
    """A decode step (1 token per row, 64 rows) captured in a CUDA graph and replayed equals the
    eager op on the same inputs."""
    B = 64
    g = torch.Generator(device="cpu").manual_seed(2)
    p = _random_problem(d, m, B, B, "cuda", seed=3, capacity=80)
    p["state_kv"].normal_()
    p["state_score"].normal_()
    cu = torch.arange(B + 1, dtype=torch.int32, device="cuda")
    starts = torch.randint(0, 300, (B,), generator=g, dtype=torch.int32).cuda()
    eager = {k: v.clone() for k, v in p.items()}
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        warm = {k: v.clone() for k, v in p.items()}
        _call(torch.ops.dsv4.compress_kv, warm, cu, starts, m, 1, QUANT_FP8)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _call(torch.ops.dsv4.compress_kv, p, cu, starts, m, 1, QUANT_FP8)
    graph.replay()
    _call(torch.ops.dsv4.compress_kv, eager, cu, starts, m, 1, QUANT_FP8)
    torch.cuda.synchronize()
    for k in ("state_kv", "state_score", "entries"):
        assert torch.equal(p[k], eager[k]), k


@pytest.mark.cuda
@needs_kernel
def test_cuda_rejects_unsupported_inputs():
    p = _random_problem(128, 4, 2, 9, "cuda", seed=8)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device="cuda")
    starts = torch.zeros(2, dtype=torch.int32, device="cuda")
    op = torch.ops.dsv4.compress_kv
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        base = torch.randn(9 * 256 + 1, device="cuda")
        _call(op, {**p, "kv": base[1:].view(9, 256)}, cu, starts, 4, 5, QUANT_NONE)
    with pytest.raises(RuntimeError, match="entries must be bfloat16 or float32"):
        _call(op, {**p, "entries": p["entries"].half()}, cu, starts, 4, 5, QUANT_NONE)
    with pytest.raises(RuntimeError, match="must be on"):
        _call(op, {**p, "ape": p["ape"].cpu()}, cu, starts, 4, 5, QUANT_NONE)
    with pytest.raises(RuntimeError, match="power of two"):
        q = _random_problem(96, 4, 2, 9, "cuda", seed=8)
        _call(op, q, cu, starts, 4, 5, QUANT_FP4_HADAMARD)


# ---------------------------------------------------------------------------------------------
# opcheck (schema, fake, autograd registration, AOT dispatch)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda])])
@pytest.mark.parametrize("m,d,quant", [(4, 128, QUANT_FP8), (16, 64, QUANT_FP4_HADAMARD)])
def test_opcheck(device, m, d, quant):
    p = _random_problem(d, m, 2, 11, device, seed=6)
    cu = torch.tensor([0, 5, 11], dtype=torch.int32, device=device)
    starts = torch.tensor([2, 0], dtype=torch.int32, device=device)
    args = (p["kv"], p["score"], p["ape"], p["norm_weight"], p["freqs"], cu, starts,
            p["state_kv"], p["state_score"], p["entries"], m, 6, EPS, quant)
    torch.library.opcheck(torch.ops.dsv4.compress_kv.default, args)
