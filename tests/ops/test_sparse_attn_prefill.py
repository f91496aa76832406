"""torch.ops.dsv4.sparse_attn through the warp-specialised prefill kernel (head_dim 512, sm_90a;
csrc/kernels/sparse_attn_prefill_sm90.cu), selected per call by DSV4_SPARSE_PREFILL=new|old
(unset = new, the default; every test here sets the variable explicitly). Its rounding differs
from the old kernel's (P is rounded to bf16 before P V), so engine tests that compare two cache
formats bit for bit pin one kernel (tests/runtime/test_engine_cuda.py); its model-level accuracy
is test_bf16_kv_cache_prefill_kernel_as_accurate_as_the_bf16_reference there.

Every case runs both kernels in one process: each must pass the tolerance rule against the fp32
reference (error <= 2x that of the reference computed in bf16, inf positions equal, poisoned
outputs overwritten; ``_check_kernel`` of test_sparse_attn.py), and the new one must agree with
the old one within the same bound. The op takes the new kernel only when the token x head-tile
grid fills the GPU (2 * tokens * ceil(heads / 64) > SMs, so no key split); the cases below are
sized for that, and one test reads the profiler's kernel names to prove it.

DSV4_SPARSE_PREFILL_PERSISTENT=1 launches the same kernel as a persistent grid (one CTA per SM
looping over (token, head-tile) tiles, barrier phases running on across tiles). Every test below
runs with it unset (one CTA per tile) unless it sets it; the ``persistent`` tests check that grid
against the reference and against one CTA per tile, with several tiles per CTA and tiles of
every iteration count, none included.
"""

from __future__ import annotations

import math

import pytest
import torch

from dsv4.ops.attention import sparse_attn_reference
from _profiling import cuda_kernel_names  # (tests/_profiling.py)
from test_sparse_attn import _check_kernel, _random_case, needs_kernel

pytestmark = [pytest.mark.cuda, needs_kernel]

D = 512


def _min_tokens(H: int) -> int:
    """Fewest tokens for which the op takes the unsplit (prefill) path on this GPU."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return sms // (2 * ((H + 63) // 64)) + 1


def _tokens(H: int, at_least: int) -> int:
    """An odd token count >= at_least that takes the prefill path."""
    T = max(at_least, _min_tokens(H))
    return T | 1


@pytest.fixture(autouse=True)
def _one_cta_per_tile(monkeypatch):
    """The persistent-grid switch is off unless a test sets it."""
    monkeypatch.delenv("DSV4_SPARSE_PREFILL_PERSISTENT", raising=False)


def _run_both(a, monkeypatch, out_variant=False):
    """The case through the new kernel, then the old one; each checked against the fp32
    reference; returns (new out, new lse, old out, old lse)."""
    monkeypatch.setenv("DSV4_SPARSE_PREFILL", "new")
    new_o, new_l = _check_kernel(a, out_variant)
    monkeypatch.setenv("DSV4_SPARSE_PREFILL", "old")
    old_o, old_l = _check_kernel(a, out_variant)
    monkeypatch.setenv("DSV4_SPARSE_PREFILL", "new")
    # The two kernels agree more closely than the bf16-math reference agrees with fp32 (each
    # alone is only held to twice that).
    lo_o, _ = sparse_attn_reference(**a, skip_out_of_range=True, compute_dtype=torch.bfloat16)
    ref_o, _ = sparse_attn_reference(
        **{k: (v.float() if isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16 else v)
           for k, v in a.items()}, skip_out_of_range=True)
    base = (lo_o.float() - ref_o).abs().max().item()
    diff = (new_o.float() - old_o.float()).abs().max().item()
    assert diff <= base + 1e-5, (diff, base)
    assert torch.equal(torch.isinf(new_l), torch.isinf(old_l))
    fin = torch.isfinite(old_l)
    if fin.any():
        assert (new_l[fin] - old_l[fin]).abs().max().item() <= 1e-3
    return new_o, new_l, old_o, old_l


@pytest.mark.parametrize("H", [64, 128, 1, 96])
@pytest.mark.parametrize("scopes", ["main", "two"])
@pytest.mark.parametrize("lengths", [True, False])
def test_prefill_matches_reference_and_old_kernel(H, scopes, lengths, monkeypatch):
    # Odd token count; -1 at the front (a whole first block), all-invalid rows, duplicates,
    # indices >= n and < -1, lengths with garbage tails (clamped at 0 and at k), sinks +-inf;
    # topk not a multiple of 64 (partial last block, odd block counts).
    T = _tokens(H, 135)
    if scopes == "main":
        a = _random_case(T, H, D, 700, 200, seed=H + lengths, device="cuda",
                         dtype=torch.bfloat16, lengths=lengths)
    else:
        a = _random_case(T, H, D, 300, 130, 900, 77, seed=2 * H + lengths, device="cuda",
                         dtype=torch.bfloat16, lengths=lengths)
    out, lse, _, _ = _run_both(a, monkeypatch)
    if H >= 2:
        assert (out[:, 0] == 0).all()                      # sink = +inf head
    if scopes == "main":
        assert (lse[3::7] == math.inf).all()               # all-invalid rows
        assert (out[3::7] == 0).all()


@pytest.mark.parametrize("K1,K2", [(64, 0), (192, 0), (100, 0), (512, 0), (1024, 0), (128, 512),
                                   (128, 1024), (1, 1), (65, 63)])
def test_prefill_block_counts(K1, K2, monkeypatch):
    # Block counts 1, 2, odd and even, partial blocks at the end of either scope, V4-Flash /
    # V4-Pro key counts (window 128 + compressed top-k).
    H = 64
    T = _tokens(H, 67)
    a = _random_case(T, H, D, 4000, K1, 3000 if K2 else 0, K2, seed=K1 * 7 + K2,
                     device="cuda", dtype=torch.bfloat16, sink_inf=False)
    _run_both(a, monkeypatch)


@pytest.mark.parametrize("order", ["ascending", "descending"])
def test_prefill_running_max_moves_every_block(order, monkeypatch):
    # Logits that grow (or shrink) block after block, so the running max moves in every block and
    # between the two blocks of an iteration (both rescale paths, and P0's rescale before WG1's
    # product): logits ~ (position of the row in kv) / N * 30, plus noise.
    H, N, K = 128, 2048, 1024
    T = _tokens(H, 67)
    g = torch.Generator().manual_seed(5)
    u = torch.randn(D, generator=g)
    u = u / u.norm()
    q = (4.0 * u + 0.3 * torch.randn(T, H, D, generator=g)) * math.sqrt(D) / 4
    kv = torch.linspace(0, 30, N)[:, None] * u + 0.3 * torch.randn(N, D, generator=g)
    rows = torch.stack([torch.randperm(N, generator=g)[:K].sort().values for _ in range(T)])
    if order == "descending":
        rows = rows.flip(1)
    a = dict(q=q.bfloat16().cuda(), kv=kv.bfloat16().cuda(), indices=rows.int().cuda(),
             attn_sink=torch.randn(H, generator=g).cuda(), softmax_scale=D ** -0.5)
    _run_both(a, monkeypatch)


def test_prefill_sink_limits_and_empty_rows(monkeypatch):
    H = 128
    T = _tokens(H, 67)
    a = _random_case(T, H, D, 300, 192, seed=8, device="cuda", dtype=torch.bfloat16)
    a["indices"][0] = -1
    a["indices"][1, :] = 300                        # all >= n_kv
    a["indices"][2, :] = torch.iinfo(torch.int32).min
    a["topk_length"] = None
    a["attn_sink"] = torch.tensor([math.inf, -math.inf, 0.0, 50.0] * (H // 4), device="cuda")
    out, lse, _, _ = _run_both(a, monkeypatch)
    assert (out[:3] == 0).all() and (lse[:3] == math.inf).all()
    assert (out[:, 0::4] == 0).all()                # sink = +inf heads


def test_prefill_zero_length_rows_and_empty_scopes(monkeypatch):
    H = 64
    T = _tokens(H, 67)
    a = _random_case(T, H, D, 500, 128, 400, 64, seed=3, device="cuda", dtype=torch.bfloat16)
    a["topk_length"] = torch.zeros(T, dtype=torch.int32, device="cuda")
    a["topk_length"][::2] = 128
    a["extra_topk_length"] = torch.zeros(T, dtype=torch.int32, device="cuda")
    a["extra_topk_length"][::3] = 64
    out, lse, _, _ = _run_both(a, monkeypatch)
    none = (a["topk_length"] == 0) & (a["extra_topk_length"] == 0)   # no lane at all
    assert (lse[none] == math.inf).all() and (out[none] == 0).all()


def test_prefill_out_variant_strided_inputs(monkeypatch):
    H = 64
    T = _tokens(H, 67)
    a = _random_case(T, H, D, 200, 150, 100, 70, seed=4, device="cuda", dtype=torch.bfloat16)
    base = torch.randn(200, D + 64, device="cuda").bfloat16()
    base[:, 32:32 + D] = a["kv"]
    a["kv"] = base[:, 32:32 + D]                                    # row stride D + 64, aligned
    a["q"] = a["q"].transpose(0, 1).contiguous().transpose(0, 1)   # heads outermost
    a["indices"] = a["indices"].t().contiguous().t()               # column-major indices
    _run_both(a, monkeypatch, out_variant=True)


def test_prefill_decode_batch_shapes(monkeypatch):
    # Decode at batch 128 x 2 query tokens (window 128 + compressed top-512): unsplit, so it
    # takes the prefill kernel too.
    H, batch, K2 = 64, 128, 512
    T = 2 * batch
    g = torch.Generator().manual_seed(11)
    a = _random_case(T, H, D, 128 * batch, 128, 8192, K2, seed=12, device="cuda",
                     dtype=torch.bfloat16, sink_inf=False)
    seq = torch.arange(T) // 2
    a["indices"] = (seq[:, None] * 128 + torch.arange(128)).int().cuda()
    a["topk_length"] = torch.randint(1, 129, (T,), generator=g, dtype=torch.int32).cuda()
    a["extra_topk_length"] = torch.randint(0, K2 + 1, (T,), generator=g, dtype=torch.int32).cuda()
    _run_both(a, monkeypatch)


def test_prefill_70000_queries(monkeypatch):
    # 70,000 query tokens on grid.x (FlashMLA #182), two scopes, one block each.
    a = _random_case(70000, 2, D, 3000, 64, 2000, 40, seed=7, device="cuda",
                     dtype=torch.bfloat16, sink_inf=False)
    monkeypatch.setenv("DSV4_SPARSE_PREFILL", "new")
    _check_kernel(a)


def test_prefill_kernel_is_the_one_that_runs(monkeypatch):
    H = 64
    a = _random_case(_tokens(H, 67), H, D, 300, 128, seed=1, device="cuda", dtype=torch.bfloat16)
    names = {}
    for mode in ("new", "old", None):    # None: unset, the default (the new kernel)
        if mode is None:
            monkeypatch.delenv("DSV4_SPARSE_PREFILL", raising=False)
        else:
            monkeypatch.setenv("DSV4_SPARSE_PREFILL", mode)
        torch.ops.dsv4.sparse_attn(**a)
        names[mode] = " ".join(cuda_kernel_names(lambda: torch.ops.dsv4.sparse_attn(**a)))
    if "sparse_attn" not in names["old"]:
        pytest.skip("the profiler recorded no CUDA kernels here (no CUPTI)")
    assert "sparse_attn_prefill_sm90_kernel" in names["new"]
    assert "sparse_attn_prefill_sm90_kernel" not in names["old"]
    assert "sparse_attn_prefill_sm90_kernel" in names[None]       # the default


def test_prefill_env_switch_rejects_unknown_values(monkeypatch):
    a = _random_case(_tokens(64, 67), 64, D, 100, 64, seed=2, device="cuda", dtype=torch.bfloat16)
    monkeypatch.setenv("DSV4_SPARSE_PREFILL", "fast")
    with pytest.raises(RuntimeError, match="DSV4_SPARSE_PREFILL must be 'new' or 'old'"):
        torch.ops.dsv4.sparse_attn(**a)


def _persistent_vs_per_tile(a, monkeypatch, out_variant=False):
    """The case through the new kernel as one CTA per tile, then as the persistent grid; each
    checked against the fp32 reference; the two agree (the same per-tile arithmetic: equal up to
    the compiler's instruction choices, far inside the bf16-vs-fp32 error). Returns (out, lse) of
    the persistent grid."""
    monkeypatch.setenv("DSV4_SPARSE_PREFILL", "new")
    monkeypatch.delenv("DSV4_SPARSE_PREFILL_PERSISTENT", raising=False)
    one_o, one_l = _check_kernel(a, out_variant)
    monkeypatch.setenv("DSV4_SPARSE_PREFILL_PERSISTENT", "1")
    per_o, per_l = _check_kernel(a, out_variant)
    monkeypatch.delenv("DSV4_SPARSE_PREFILL_PERSISTENT", raising=False)
    assert torch.equal(torch.isinf(per_l), torch.isinf(one_l))
    scale = one_o.float().abs().max().clamp_min(1e-6)
    assert ((per_o.float() - one_o.float()).abs().max() / scale).item() <= 1e-2
    fin = torch.isfinite(one_l)
    if fin.any():
        assert (per_l[fin] - one_l[fin]).abs().max().item() <= 1e-3
    return per_o, per_l


def _several_tiles_per_cta(H: int) -> int:
    """An odd token count giving each CTA of the persistent grid about 5 tiles."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return (5 * sms // ((H + 63) // 64)) | 1


@pytest.mark.parametrize("H", [64, 128, 1, 96])
@pytest.mark.parametrize("scopes", ["main", "two"])
@pytest.mark.parametrize("lengths", [True, False])
def test_persistent_grid_matches_reference_and_one_cta_per_tile(H, scopes, lengths, monkeypatch):
    # Per-token lengths (lengths=True) give neighbouring tiles of one CTA different iteration
    # counts, 0 included (lengths clamped at 0, all-invalid rows keep their iterations).
    T = _several_tiles_per_cta(H)
    if scopes == "main":
        a = _random_case(T, H, D, 700, 200, seed=40 + H + lengths, device="cuda",
                         dtype=torch.bfloat16, lengths=lengths)
    else:
        a = _random_case(T, H, D, 300, 130, 900, 77, seed=50 + 2 * H + lengths, device="cuda",
                         dtype=torch.bfloat16, lengths=lengths)
    _persistent_vs_per_tile(a, monkeypatch)


@pytest.mark.parametrize("K1,K2", [(64, 0), (100, 0), (1024, 0), (128, 512), (1, 1), (65, 63)])
def test_persistent_grid_block_counts(K1, K2, monkeypatch):
    H = 64
    a = _random_case(_several_tiles_per_cta(H), H, D, 4000, K1, 3000 if K2 else 0, K2,
                     seed=K1 * 5 + K2, device="cuda", dtype=torch.bfloat16, sink_inf=False)
    _persistent_vs_per_tile(a, monkeypatch)


def test_persistent_grid_tiles_without_keys_and_out_variant(monkeypatch):
    # Runs of tiles without any key between tiles with keys (row sums alternate between two
    # buffers for that), strided q, the out-variant.
    H = 128
    T = _several_tiles_per_cta(H)
    a = _random_case(T, H, D, 500, 128, 400, 64, seed=60, device="cuda", dtype=torch.bfloat16)
    a["topk_length"] = torch.zeros(T, dtype=torch.int32, device="cuda")
    a["topk_length"][::5] = 128
    a["extra_topk_length"] = torch.zeros(T, dtype=torch.int32, device="cuda")
    a["extra_topk_length"][1::3] = 64
    a["q"] = a["q"].transpose(0, 1).contiguous().transpose(0, 1)   # heads outermost
    out, lse = _persistent_vs_per_tile(a, monkeypatch, out_variant=True)
    none = (a["topk_length"] == 0) & (a["extra_topk_length"] == 0)
    assert (lse[none] == math.inf).all() and (out[none] == 0).all()


def test_persistent_grid_70000_queries(monkeypatch):
    # ~530 tiles per CTA (barrier phases over hundreds of tiles).
    a = _random_case(70000, 2, D, 3000, 64, 2000, 40, seed=70, device="cuda",
                     dtype=torch.bfloat16, sink_inf=False)
    monkeypatch.setenv("DSV4_SPARSE_PREFILL", "new")
    monkeypatch.setenv("DSV4_SPARSE_PREFILL_PERSISTENT", "1")
    _check_kernel(a)


# --------------------------------------------------------------------------- engine patterns
# What the runtime engine passes (tests/runtime/test_engine_cuda.py::test_fp8_kv_cache_on_cuda,
# logged on CPU with the kernel path forced, /work/wt/notes/ws-bug.md): the tiny model at
# head_dim 512 has window 16 and CSA top-8, so every call is ONE iteration of the kernel (a
# partial 16-lane window block, plus an 8-lane extra block for CSA); -1 at the front of the
# window of a sequence's first 15 tokens; -1 tails in the extra lists and rows without any
# entry (positions < 3); sinks 0; softmax_scale 512^-0.5; RMS-normalised q and keys; contiguous
# q / kv / indices; no lengths; T = 96 (one sequence's first chunk, kv = 16 ring rows + 96 new),
# 94 (a mixed step: 54 + 40 tokens of two sequences, kv = 32 ring rows + 94 new) and 2 (decode:
# kv = the 3-slot ring in place, rotated all-valid windows). The window-only decode call has one
# key block, so the op never splits it: it takes this kernel for T = 2 (inside the engine's
# decode CUDA graph), far below the grids the tests above use.
_ENGINE_STEPS = {"first-chunk": [(0, 96)], "mixed": [(96, 54), (0, 40)],
                 "decode": [(150, 1), (40, 1)]}


def _engine_step(kind, H, csa, seed, W=16, topk=8, ratio=4, block=256):
    """sparse_attn arguments shaped like the engine's (see above): rows (start, new tokens)."""
    g = torch.Generator().manual_seed(seed)
    rows = _ENGINE_STEPS[kind]
    B, T = len(rows), sum(n for _, n in rows)

    def rms(*shape):
        x = torch.randn(*shape, generator=g)
        return (x / x.pow(2).mean(-1, keepdim=True).sqrt()).bfloat16()

    row = torch.cat([torch.full((n,), b) for b, (_, n) in enumerate(rows)])
    pos = torch.cat([torch.arange(s, s + n) for s, n in rows])
    start = torch.tensor([s for s, _ in rows])[row]
    offset = torch.tensor([0] + [n for _, n in rows]).cumsum(0)[row]
    p = pos[:, None] - (W - 1) + torch.arange(W)[None, :]
    if kind == "decode":
        kv = rms((B + 1) * W, D)                  # every slot's ring (+ the padding slot)
        idx = row[:, None] * W + p % W
    else:
        kv = rms(B * W + T, D)                    # the rows' rings, then the step's new keys
        idx = torch.where(p >= start[:, None], B * W + offset[:, None] + (p - start[:, None]),
                          row[:, None] * W + p % W)
    idx = torch.where(p >= 0, idx, -1).int()
    a = dict(q=rms(T, H, D), kv=kv, indices=idx, attn_sink=torch.zeros(H),
             softmax_scale=D ** -0.5)
    if csa:
        extra = torch.full((T, topk), -1, dtype=torch.int32)
        for t in range(T):
            n = int(pos[t] + 1) // ratio              # complete entries of the sequence
            pick = torch.randperm(n, generator=g)[:topk]
            extra[t, :pick.numel()] = row[t] * block + pick
        a.update(extra_kv=rms(3 * block, D), extra_indices=extra)
    return {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}


def _takes_new_kernel(a) -> bool:
    """The glue's rule: head_dim 512 and no key split (one key block, or the token x
    head-tile grid over half the SMs)."""
    T, H, _ = a["q"].shape
    k2 = a["extra_indices"].shape[1] if a.get("extra_indices") is not None else 0
    blocks = -(-a["indices"].shape[1] // 64) + -(-k2 // 64)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return blocks <= 1 or 2 * T * -(-H // 64) > sms


@pytest.mark.parametrize("H", [4, 64])
@pytest.mark.parametrize("kind", list(_ENGINE_STEPS))
@pytest.mark.parametrize("csa", [False, True], ids=["window", "window+csa"])
def test_engine_argument_patterns(H, kind, csa, monkeypatch):
    a = _engine_step(kind, H, csa, seed=H + 3 * csa + 7 * len(kind))
    # (decode with CSA is split over its two key blocks: the old kernel both times)
    assert _takes_new_kernel(a) == (kind != "decode" or not csa)
    out, lse, _, _ = _run_both(a, monkeypatch)
    if csa and kind == "first-chunk":                # tokens 0-2: window only, no entry yet
        assert (a["extra_indices"][:3] == -1).all() and torch.isfinite(lse[:3]).all()


@pytest.mark.parametrize("H", [4, 64])
def test_engine_decode_window_call_in_a_cuda_graph(H, monkeypatch):
    # The engine's decode step runs the window-only call (this kernel, T = 2) from a CUDA graph:
    # capture it, refill the static inputs with another step's values, replay; the replay equals
    # the eager call on those inputs and passes the reference rule.
    monkeypatch.setenv("DSV4_SPARSE_PREFILL", "new")
    a = _engine_step("decode", H, False, seed=1)
    b = _engine_step("decode", H, False, seed=2)
    assert _takes_new_kernel(a)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.ops.dsv4.sparse_attn(**a)               # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = torch.ops.dsv4.sparse_attn(**a)
    for k in ("q", "kv", "indices"):
        a[k].copy_(b[k])
    out.fill_(float("nan"))
    lse.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    eager_o, eager_l = _check_kernel(b)
    assert torch.equal(out, eager_o) and torch.equal(lse, eager_l)


@pytest.mark.parametrize("heads", [4, 64])
def test_engine_calls_through_both_kernels(heads, monkeypatch):
    # Every sparse_attn call of the engine scenario of tests/runtime/test_engine_cuda.py::
    # test_fp8_kv_cache_on_cuda (bf16 KV cache, eager decode so that every call is recorded),
    # replayed through both kernels against the fp32 reference (the per-call rule).
    import dsv4
    import dsv4.layers.attention as attention
    from dsv4.runtime import Engine, SamplingParams

    monkeypatch.setenv("DSV4_SPARSE_PREFILL", "new")
    calls = []

    class _Recorder:
        def __getattr__(self, name):
            op = getattr(torch.ops.dsv4, name)
            if name != "sparse_attn":
                return op

            def call(*args, **kw):
                names = ("q", "kv", "indices", "attn_sink", "softmax_scale", "topk_length",
                         "extra_kv", "extra_indices", "extra_topk_length")
                got = {**dict(zip(names, args)), **kw}
                calls.append({k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
                              for k, v in got.items()})
                return op(*args, **kw)
            return call

    monkeypatch.setattr(attention, "_dsv4", _Recorder())
    torch.manual_seed(0)
    cfg = dsv4.ModelConfig.tiny(head_dim=512, quant_sim=True, n_heads=heads)
    m16 = dsv4.Model(cfg).eval().to("cuda", torch.bfloat16)
    engine = Engine(m16, max_batch=2, max_model_len=320, max_num_batched_tokens=96,
                    kv_cache="bf16", cuda_graphs=False)
    g = torch.Generator().manual_seed(6)
    for n in (150, 40):
        engine.add_request(torch.randint(0, 129280, (n,), generator=g).tolist(),
                           SamplingParams(max_new_tokens=8, eos_token_id=-1))
    while engine.has_unfinished():
        engine.step()
    assert calls
    assert sum(_takes_new_kernel(a) for a in calls) >= 4      # prefill steps and decode
    for a in calls:
        _run_both(a, monkeypatch)
