"""dsv4.ops.split_gemm: an fp32-weight linear on bf16 tensor cores through an exact 3-way split
of the weight (the compressors' projections at prefill size).

CPU: the split is exact, and the routing rule (bf16 x, fp32 weight, CUDA, no gradient, rows,
DSV4_FP32_LINEAR). CUDA (runs on the H200): the split GEMMs against an fp64 product and
PyTorch's fp32 GEMM on fresh random inputs, outputs poisoned; the model's compressor
projections take them at prefill size and give the fp32 path's values."""

from __future__ import annotations

import pytest
import torch

import dsv4
from dsv4.layers import linear as L
from dsv4.ops import split_gemm as S

cuda = pytest.mark.cuda


@pytest.mark.parametrize("scale", [1e-20, 1e-3, 1.0, 3e4, 1e30])
def test_split_is_exact(scale):
    g = torch.Generator().manual_seed(int(abs(torch.tensor(scale).log2())) + 7)
    w = torch.randn(257, 129, generator=g) * scale
    # (|w| >= 1e-3 scale: every term stays in the normal range, see the next test)
    w = torch.where(w.abs() < 1e-3 * scale, torch.full_like(w, 1e-3 * scale), w)
    w[0, :3] = torch.tensor([1.0 + 2 ** -23, -(1.0 + 2 ** -23), 1.0 - 2 ** -24]) * scale
    hi, mid, lo = S.split_bf16x3(w)
    assert hi.dtype == mid.dtype == lo.dtype == torch.bfloat16
    assert torch.equal(hi.float() + mid.float() + lo.float(), w)
    # each term carries the next significant bits: |mid| <= half an ulp of hi
    assert (mid.float().abs() <= hi.float().abs() * 2 ** -8).all()


def test_split_of_tiny_weights_loses_only_below_the_normal_range():
    """Weights so small that a term falls below fp32's normal range lose only what lies
    there (an absolute error below 2^-126 per weight)."""
    w = torch.tensor([1e-40, -3e-39, 1e-36, 2 ** -126 * 1.5, 1e-30 * (1 + 2 ** -23)])
    hi, mid, lo = S.split_bf16x3(w)
    assert ((hi.float() + mid.float() + lo.float()) - w).abs().max() < 2 ** -126


def test_split_rejects_a_non_fp32_weight():
    with pytest.raises(ValueError, match="float32"):
        S.split_bf16x3(torch.ones(2, 2, dtype=torch.bfloat16))


def test_use_split_rule(monkeypatch):
    """The row rule (device-free) and DSV4_FP32_LINEAR's parse; a CPU or fp32 x never."""
    from dsv4.ops.backend import env_choice

    assert not S.split_rule(S.SPLIT_MIN_ROWS - 1) and S.split_rule(S.SPLIT_MIN_ROWS)
    assert S.split_rule(1, "split") and not S.split_rule(10 ** 9, "fp32")
    for raw, want in (("fp32", "fp32"), (" FP32 ", "fp32"), ("Split", "split"), ("", "")):
        monkeypatch.setenv("DSV4_FP32_LINEAR", raw)
        assert env_choice("DSV4_FP32_LINEAR", ("", "fp32", "split")) == want
    monkeypatch.setenv("DSV4_FP32_LINEAR", "off")
    with pytest.warns(RuntimeWarning, match="DSV4_FP32_LINEAR='off' is not one of"):
        assert env_choice("DSV4_FP32_LINEAR", ("", "fp32", "split")) == ""
    monkeypatch.setenv("DSV4_FP32_LINEAR", "split")
    w = torch.randn(8, 16)
    x = torch.randn(S.SPLIT_MIN_ROWS, 16).to(torch.bfloat16)
    assert not S.use_split(x, w)                       # a CPU tensor never
    assert not S.use_split(x.float(), w)               # an fp32 x never (not exact in bf16)


def test_fp32_input_casts_unless_every_consumer_takes_the_split(monkeypatch):
    """fp32_input hands x on uncast only when every linear of the input is a plain dsv4 Linear
    for which the split path serves; a hook, another module or a native-format weight gets
    x.float() (what they were promised)."""
    monkeypatch.setattr(L, "_split_serves", lambda x, w: True)     # as on CUDA at 4096+ rows
    a, b = L.Linear(16, 8, keep_fp32=True), L.Linear(16, 8, keep_fp32=True)
    x = torch.randn(4, 16).to(torch.bfloat16)
    assert L.fp32_input(x, (a, b)) is x
    h = a.register_forward_pre_hook(lambda m, args: None)
    assert L.fp32_input(x, (a, b)).dtype == torch.float32
    h.remove()
    assert L.fp32_input(x, (a, torch.nn.Linear(16, 8))).dtype == torch.float32
    monkeypatch.setattr(L, "_split_serves", lambda x, w: False)
    assert L.fp32_input(x, (a, b)).dtype == torch.float32


def test_bf16_copy_is_checked_once_per_weight_version(monkeypatch):
    """bf16_copy: a copy for a weight whose values are all bf16, None otherwise; the check runs
    once per (storage, version): an in-place change or a new storage redoes it; a check
    without keeping (bf16_valued) then one with keeping makes the copy; DSV4_FP32_LINEAR=fp32
    turns it off. (Device-free: the operand rule is patched to accept CPU tensors.)"""
    monkeypatch.setattr(S, "_operands_qualify", lambda x, w: True)
    monkeypatch.delenv("DSV4_FP32_LINEAR", raising=False)
    checks = []
    equal = torch.equal
    monkeypatch.setattr(torch, "equal", lambda a, b: checks.append(1) or equal(a, b))
    x = torch.randn(3, 16).to(torch.bfloat16)
    w = torch.randn(8, 16).bfloat16().float()
    assert S.bf16_valued(x, w) and len(checks) == 1
    hi = S.bf16_copy(x, w)                          # keeps a copy now, no second check
    assert hi.dtype == torch.bfloat16 and equal(hi.float(), w) and len(checks) == 1
    assert S.bf16_copy(x, w) is hi and len(checks) == 1
    with torch.no_grad():
        w[0, 0] += 2 ** -20                         # no longer a bf16 value
    assert S.bf16_copy(x, w) is None and not S.bf16_valued(x, w) and len(checks) == 2
    with torch.no_grad():
        w[0, 0] = 1.5
    hi2 = S.bf16_copy(x, w)
    assert hi2 is not None and hi2[0, 0].item() == 1.5 and len(checks) == 3
    w.data = w.detach().clone()                     # a new storage
    assert S.bf16_copy(x, w) is not None and len(checks) == 4
    monkeypatch.setenv("DSV4_FP32_LINEAR", "fp32")
    assert S.bf16_copy(x, w) is None and not S.bf16_valued(x, w)
    monkeypatch.delenv("DSV4_FP32_LINEAR")
    with torch.inference_mode():    # no version counter: never a copy (and no error)
        wi = torch.randn(8, 16).bfloat16().float()
    assert S.bf16_copy(x, wi) is None and not S.bf16_valued(x, wi)
    with torch.inference_mode():
        assert S.bf16_copy(x, w) is not None      # a normal weight used in inference mode


def test_a_fused_groups_copy_follows_writes_through_its_members(monkeypatch):
    """A fused group's buffer is viewed by its members' Parameters: a write through a member
    (load_state_dict copies in place) advances the member's version, not the buffer's; the
    copy follows the members' versions (``also``), so it is remade with the new values."""
    monkeypatch.setattr(S, "_operands_qualify", lambda x, w: True)
    monkeypatch.delenv("DSV4_FP32_LINEAR", raising=False)
    a, b = L.Linear(16, 8, keep_fp32=True), L.Linear(16, 4, keep_fp32=True)
    for lin in (a, b):
        with torch.no_grad():
            lin.weight.copy_(lin.weight.bfloat16())
    g = L.LinearGroup.fuse([a, b])
    assert g is not None
    x = torch.randn(2, 16).to(torch.bfloat16)
    first = S.bf16_copy(x, g.weight, g.params)
    assert torch.equal(first.float(), g.weight)
    new = torch.randn(4, 16).bfloat16().float()
    b.load_state_dict({"weight": new})              # in place, through the member
    assert g.intact([a, b])
    again = S.bf16_copy(x, g.weight, g.params)
    assert again is not first and torch.equal(again[8:].float(), new)
    assert S.bf16_copy(x, g.weight, g.params) is again


def test_recorded_copies_go_stale_with_their_weights(monkeypatch):
    """recording_copies lists the copies served inside it (holding them); copies_current turns
    False after a write through the weight or one of its ``also`` tensors, or when the weight
    is gone."""
    monkeypatch.setattr(S, "_operands_qualify", lambda x, w: True)
    monkeypatch.delenv("DSV4_FP32_LINEAR", raising=False)
    x = torch.randn(2, 16).to(torch.bfloat16)
    w = torch.randn(8, 16).bfloat16().float()
    m = torch.nn.Parameter(w[:4], requires_grad=False)   # an "also" tensor
    with S.recording_copies() as recs:
        hi = S.bf16_copy(x, w, (m,))
        assert S.bf16_copy(torch.randn(2, 16), torch.randn(3, 16)) is None   # not bf16: none
    assert len(recs) == 1 and recs[0][3] is hi and S.copies_current(recs)
    assert S.bf16_copy(x, w, (m,)) is hi                 # outside: served, not recorded
    assert len(recs) == 1
    with torch.no_grad():
        m.mul_(2)                                       # (still bf16 values)
    assert not S.copies_current(recs)
    with S.recording_copies() as recs2:
        S.bf16_copy(x, w, (m,))
    assert S.copies_current(recs2)
    with torch.no_grad():
        w.mul_(2)
    assert not S.copies_current(recs2)
    with S.recording_copies() as recs3:
        S.bf16_copy(x, w, (m,))
    del w
    assert not S.copies_current(recs3)


def test_random_compressor_weights_hold_bf16_values():
    """As the release stores them (fp32 parameters, bf16 values): the compressors' wkv / wgate
    of a random model."""
    m = dsv4.Model(dsv4.ModelConfig.tiny())
    ws = [p for n, p in m.named_parameters()
          if ".compressor." in n and n.endswith(("wkv.weight", "wgate.weight"))]
    assert ws
    for p in ws:
        assert p.dtype == torch.float32 and torch.equal(p.bfloat16().float(), p)


@cuda
@pytest.mark.parametrize("M,N,K", [(1, 2560, 4096), (1, 8, 64), (7, 24, 136), (2048, 1024, 4096)])
def test_bf16_linear_matches_fp64(M, N, K):
    """One bf16 GEMM on the copy of a bf16-valued fp32 weight: within the error bound of an fp32
    GEMM of the same operands (the products are exact), output poisoned first."""
    g = torch.Generator(device="cuda").manual_seed(M * 7 + N + K)
    x = torch.randn(M, K, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(N, K, device="cuda", generator=g) * K ** -0.5).bfloat16().float()
    w[0] *= 2 ** -10
    hi = S.bf16_copy(x, w)
    assert hi is not None
    out = torch.full((M, N), float("nan"), device="cuda")
    out.copy_(S.linear_bf16(x, hi))
    truth = x.double() @ w.double().t()
    bound = (x.double().abs() @ w.double().abs().t()) * (K * 2 ** -24 * 4)
    assert ((out.double() - truth).abs() <= bound).all()
    assert S.bf16_copy(x, w + 2 ** -30) is None       # not all bf16 values


@cuda
@pytest.mark.parametrize("M,N,K", [(1, 8, 64), (7, 24, 136), (512, 2560, 4096),
                                   (1000, 1024, 4096), (3, 5, 40)])
def test_split_linear_matches_fp64(M, N, K):
    """Against the fp64 product of the same operands: within the error of an fp32 GEMM
    (the products are exact; only fp32 additions round), and close to PyTorch's fp32 GEMM."""
    g = torch.Generator(device="cuda").manual_seed(M * 131 + N + K)
    x = torch.randn(M, K, device="cuda", generator=g).to(torch.bfloat16)
    w = torch.randn(N, K, device="cuda", generator=g) * K ** -0.5
    w[0] *= 1e-3                                       # rows of very different magnitude
    y = S.linear_bf16x3(x, w)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    truth = x.double() @ w.double().t()
    fp32 = x.float() @ w.t()
    bound = (x.double().abs() @ w.double().abs().t()) * (K * 2 ** -24 * 4)
    assert ((y.double() - truth).abs() <= bound).all()
    assert ((fp32.double() - truth).abs() <= bound).all()      # the bound holds for fp32 too
    # three GEMMs of a split: the same additions in another order, never more than 8 fp32 ulps
    # of the magnitude sum off the fp32 GEMM
    torch.testing.assert_close(y, fp32, rtol=0, atol=float((bound / 4).max()))


@cuda
def test_split_linear_leading_dims_and_poisoned_output():
    """x [2, 300, K] (rows as a batch), the result written over a NaN-filled buffer by the
    caller's copy: every value is written."""
    g = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(2, 300, 256, device="cuda", generator=g).to(torch.bfloat16)
    w = torch.randn(96, 256, device="cuda", generator=g)
    out = torch.full((2, 300, 96), float("nan"), device="cuda")
    out.copy_(S.linear_bf16x3(x, w))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, x.float() @ w.t(), rtol=1e-5, atol=1e-4)


@cuda
def test_dense_linear_routes_by_rows_and_env(monkeypatch):
    """dense_linear on bf16 x with an fp32 weight: the split GEMMs from SPLIT_MIN_ROWS rows
    (fp32 output, the fp32 path's values), PyTorch's fp32 GEMM below it and with
    DSV4_FP32_LINEAR=fp32; never under the reference backend or when a gradient is needed."""
    calls = []
    orig = S.linear_bf16x3
    monkeypatch.setattr(L, "linear_bf16x3", lambda x, w: calls.append(x.shape) or orig(x, w))
    monkeypatch.delenv("DSV4_FP32_LINEAR", raising=False)
    g = torch.Generator(device="cuda").manual_seed(9)
    w = torch.randn(64, 512, device="cuda", generator=g)
    big = torch.randn(S.SPLIT_MIN_ROWS, 512, device="cuda", generator=g).to(torch.bfloat16)
    small = big[:S.SPLIT_MIN_ROWS - 1]
    old = dsv4.get_backend()
    try:
        dsv4.set_backend("cuda")
        y = L.dense_linear(big, w)
        assert calls == [big.shape] and y.dtype == torch.float32
        torch.testing.assert_close(y, big.float() @ w.t(), rtol=1e-5, atol=1e-4)
        L.dense_linear(small, w)
        assert len(calls) == 1
        monkeypatch.setenv("DSV4_FP32_LINEAR", "fp32")
        L.dense_linear(big, w)
        assert len(calls) == 1
        monkeypatch.setenv("DSV4_FP32_LINEAR", "split")
        L.dense_linear(small, w)
        assert len(calls) == 2
        wg = w.clone().requires_grad_(True)
        L.dense_linear(big, wg)                        # autograd: PyTorch's GEMM
        assert len(calls) == 2
        dsv4.set_backend("reference")
        L.dense_linear(big, w)
        assert len(calls) == 2
    finally:
        dsv4.set_backend(old)


def _rerun_on_fp32(monkeypatch, run, m, calls: list):
    """``run(m)`` again with DSV4_FP32_LINEAR=fp32, which no bf16 path may take (``calls``, the
    recorded bf16-path calls, unchanged)."""
    n = len(calls)
    monkeypatch.setenv("DSV4_FP32_LINEAR", "fp32")
    out = run(m)
    assert len(calls) == n
    return out


def _tiny_fp32_and_bf16(seed: int, fused: bool, bf16_valued: bool):
    """(config, fp32 model, bf16 copy) of a random tiny model on CUDA, the bf16 one's same-input
    projections fused or not; ``bf16_valued=False`` first gives the compressors' weights more
    than bf16 precision (a random model draws them as bf16 values, as released)."""
    cfg = dsv4.ModelConfig.tiny()
    torch.manual_seed(seed)
    m32 = dsv4.Model(cfg).eval()
    if not bf16_valued:
        with torch.no_grad():
            for n, p in m32.named_parameters():
                if ".compressor." in n and n.endswith(("wkv.weight", "wgate.weight")):
                    p.mul_(1 + 2 ** -12 * torch.rand_like(p))
    m16 = dsv4.Model(cfg).eval()
    m16.load_state_dict(m32.state_dict())
    m32, m16 = m32.to("cuda"), m16.to("cuda", torch.bfloat16)
    if fused:
        m16.fuse_projections()
    return cfg, m32, m16


@cuda
@pytest.mark.parametrize("fused", [False, True])
def test_model_prefill_compressors_take_the_split_path(monkeypatch, fused):
    """A bf16 tiny model prefilling 2 x 600 tokens on the cuda backend with
    DSV4_FP32_LINEAR=split (the row rule would want 4096 rows): the compressors'
    projections (fused group or separate linears) run as split GEMMs, and the logits pass the
    kernel tolerance rule against the fp32 model (mean error within 2x the bf16 reference's)
    at the error level of the same path with DSV4_FP32_LINEAR=fp32."""
    calls = []
    orig = S.linear_bf16x3
    monkeypatch.setattr(L, "linear_bf16x3", lambda x, w: calls.append(w.shape) or orig(x, w))
    # compressor weights of more than bf16 precision (else one bf16 GEMM serves)
    cfg, m32, m16 = _tiny_fp32_and_bf16(0, fused, bf16_valued=False)
    ids = torch.randint(0, cfg.vocab_size, (2, 600), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(3))

    def run(m):
        with torch.no_grad():
            return m(ids, cache=m.make_cache(2)).float()

    old = dsv4.get_backend()
    try:
        truth = run(m32)
        dsv4.set_backend("reference")
        ref = run(m16)
        dsv4.set_backend("cuda")
        assert not calls
        monkeypatch.setenv("DSV4_FP32_LINEAR", "split")
        split = run(m16)
        assert calls, "no compressor projection took the split GEMMs"
        plain = _rerun_on_fp32(monkeypatch, run, m16, calls)
    finally:
        dsv4.set_backend(old)
    assert torch.isfinite(split).all()

    def err(x):
        return (x - truth).abs().mean().item()
    assert err(split) <= 2 * err(ref), (err(split), err(ref))
    assert err(split) <= 1.25 * err(plain) + 1e-6, (err(split), err(plain))


@cuda
@pytest.mark.parametrize("fused", [False, True])
def test_model_compressors_take_one_bf16_gemm(monkeypatch, fused):
    """A bf16 tiny model with random (bf16-valued, as released) compressor weights on the cuda
    backend: prefill and decode run the compressors' projections as one bf16 GEMM on the
    weights' bf16 copies (fused group or separate linears; never the split GEMMs), and the
    logits pass the kernel tolerance rule against the fp32 model at the error level of
    DSV4_FP32_LINEAR=fp32 (PyTorch's fp32 GEMM)."""
    calls, split = [], []
    orig, orig3 = S.linear_bf16, S.linear_bf16x3
    monkeypatch.setattr(L, "linear_bf16", lambda x, w: calls.append(x.shape) or orig(x, w))
    monkeypatch.setattr(L, "linear_bf16x3", lambda x, w: split.append(1) or orig3(x, w))
    monkeypatch.delenv("DSV4_FP32_LINEAR", raising=False)
    cfg, m32, m16 = _tiny_fp32_and_bf16(1, fused, bf16_valued=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 300), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(4))

    def run(m):
        with torch.no_grad():
            cache = m.make_cache(2)
            out = m(ids[:, :299], cache=cache).float()
            step = m(ids[:, 299:], cache=cache).float()       # one decode token per row
            return torch.cat([out, step], dim=1)

    old = dsv4.get_backend()
    try:
        truth = run(m32)
        dsv4.set_backend("cuda")
        got = run(m16)
        assert any(s[0] == 2 * 299 for s in calls) and any(s[0] == 2 for s in calls), calls
        assert not split
        plain = _rerun_on_fp32(monkeypatch, run, m16, calls)
    finally:
        dsv4.set_backend(old)
    assert torch.isfinite(got).all()

    def err(x):
        return (x - truth).abs().mean().item()
    assert err(got) <= 1.25 * err(plain) + 1e-6, (err(got), err(plain))


@cuda
def test_runtime_recaptures_after_a_weight_behind_a_copy_changes():
    """The runtime's decode graphs read the compressors' bf16 copies: after an in-place write
    to such a weight (no storage move, so Model.storage_version stays), the next step drops
    the graphs (a warning), captures again and gives the logits a fresh engine gives on the
    new weights."""
    import warnings

    from dsv4.runtime import Engine, SamplingParams

    def engine(m):
        return Engine(m, max_batch=2, max_model_len=128, max_num_batched_tokens=64,
                      cuda_graphs=True)

    def sampled_logits(e, prompt, n):     # one request to its end: its logits, step by step
        rid = e.add_request(prompt, SamplingParams(max_new_tokens=n, eos_token_id=-1))
        out = []
        while e.has_unfinished():
            out += [o.logits.float().cpu() for o in e.step(logits="sampled")
                    if o.request_id == rid and o.logits is not None]
        return out

    old = dsv4.get_backend()
    try:
        dsv4.set_backend("cuda")
        _, m = _tiny_fp32_and_bf16(2, True, bf16_valued=True)[1:]
        e = engine(m)
        sampled_logits(e, list(range(5, 40)), 5)
        assert e.runner.graphs and e.runner._copies, "no bf16 copy was read by the graphs"
        w = next(p for n, p in m.named_parameters()
                 if ".compressor." in n and n.endswith("wkv.weight"))
        with torch.no_grad():
            w.copy_((w * 2).bfloat16())
        version = m.storage_version
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = sampled_logits(e, list(range(7, 30)), 3)
        assert m.storage_version == version
        assert any("captured again" in str(c.message) for c in caught)
        want = sampled_logits(engine(m), list(range(7, 30)), 3)
    finally:
        dsv4.set_backend(old)
    assert len(got) == len(want) == 3
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_pending_copy_bytes_counts_each_storage_without_a_current_copy(monkeypatch):
    """The engine's memory budget: 2 bytes per element of each storage that has no current
    copy; a fused group's buffer and its members count once; a made copy is not counted again
    until its weight changes; DSV4_FP32_LINEAR=fp32 needs none; a non-fp32 weight is never
    copied. (Device-free: the device rules are patched to accept CPU tensors.)"""
    monkeypatch.setattr(S, "_operands_qualify", lambda x, w: True)
    monkeypatch.setattr(S, "_may_copy", lambda w: w.dtype == torch.float32)
    monkeypatch.delenv("DSV4_FP32_LINEAR", raising=False)
    a, b = L.Linear(16, 8, keep_fp32=True), L.Linear(16, 4, keep_fp32=True)
    c = L.Linear(16, 6, keep_fp32=True)
    for lin in (a, b, c):
        with torch.no_grad():
            lin.weight.copy_(lin.weight.bfloat16())
    g = L.LinearGroup.fuse([a, b])
    weights = [a.weight, b.weight, c.weight, torch.zeros(5, 16, dtype=torch.bfloat16)]
    assert S.pending_copy_bytes(weights) == 2 * (12 * 16 + 6 * 16)
    x = torch.randn(2, 16).to(torch.bfloat16)
    assert S.bf16_copy(x, g.weight, g.params) is not None
    assert S.pending_copy_bytes(weights) == 2 * 6 * 16
    assert S.bf16_copy(x, c.weight) is not None
    assert S.pending_copy_bytes(weights) == 0
    with torch.no_grad():
        c.weight.mul_(2)                    # a new version: its copy will be made again
    assert S.pending_copy_bytes(weights) == 2 * 6 * 16
    monkeypatch.setenv("DSV4_FP32_LINEAR", "fp32")
    assert S.pending_copy_bytes(weights) == 0


def test_pending_copy_bytes_counts_the_elements_a_copy_would_hold(monkeypatch):
    """Only the elements of the weights themselves count, not the rest of a storage they view;
    a weight whose current version was found not bf16-valued never gets a copy."""
    monkeypatch.setattr(S, "_operands_qualify", lambda x, w: True)
    monkeypatch.setattr(S, "_may_copy", lambda w: w.dtype == torch.float32)
    monkeypatch.delenv("DSV4_FP32_LINEAR", raising=False)
    big = torch.zeros(1000, 16).bfloat16().float()
    c = L.Linear(16, 4, keep_fp32=True)
    with torch.no_grad():
        c.weight.data = big[8:12]
    assert S.pending_copy_bytes([c.weight]) == 2 * 4 * 16
    d = L.Linear(16, 4, keep_fp32=True)           # random fp32 values: not bf16-valued
    x = torch.randn(2, 16).to(torch.bfloat16)
    assert S.pending_copy_bytes([d.weight]) == 2 * 4 * 16      # not checked yet
    assert S.bf16_copy(x, d.weight) is None
    assert S.pending_copy_bytes([d.weight]) == 0
