"""The runtime engine on CPU (reference ops): its logits equal dsv4.Model's, for chunked
prefill, mixed prefill + decode steps, requests joining and leaving, through a paged pool with
scattered block ids; tokens do not depend on the neighbours; admission and failure handling.

Two paths: the layers' per-sequence reference path (what CPU runs by default) and, forced, the
batched kernel path whose ops run their CPU references (the glue the GPU runs: device-only
index arithmetic, block tables, ring writes)."""

from __future__ import annotations

import os

import pytest
import torch

import dsv4
import dsv4.layers.attention as attention
from dsv4.generate import generate as reference_generate
from dsv4.runtime import Engine, EngineStepError, SamplingParams

from _model_params import vary_constant_parameters
from _runtime_common import V, random_prompts


@pytest.fixture(scope="module")
def model():
    """The tiny model with its norm weights, sinks and hc scales varied (_model_params)."""
    torch.manual_seed(0)
    return vary_constant_parameters(dsv4.Model(dsv4.ModelConfig.tiny(quant_sim=False)).eval())


class _NoPagedOps:
    """torch.ops.dsv4 as a build whose CUDA kernels reject paged arguments (docs/contracts.md §A
    before the kernels take them) would behave: the layers must fall back to the dense form."""

    def __getattr__(self, name):
        op = getattr(torch.ops.dsv4, name)

        def call(*args, **kw):
            paged = {"compress_kv": 14, "indexer_topk": 6}.get(name)
            if paged is not None and len(args) > paged and args[paged] is not None:
                raise RuntimeError(f"{name}: slots / block_table are not implemented on CUDA "
                                   "yet; the CPU reference accepts them")
            return op(*args, **kw)
        return call


@pytest.fixture(params=["reference", "kernels", "kernels-without-paged-ops"])
def path(request, monkeypatch):
    if request.param != "reference":
        monkeypatch.setattr(attention, "use_kernels", lambda x, ops, unsupported=None: True)
    if request.param == "kernels-without-paged-ops":
        import dsv4.layers.compressor as compressor
        import dsv4.layers.indexer as indexer
        monkeypatch.setattr(compressor, "_PAGED_MISSING", {})
        monkeypatch.setattr(compressor, "_dsv4", _NoPagedOps())
        monkeypatch.setattr(indexer, "_dsv4", _NoPagedOps())
    return request.param


def _engine(model, **kw):
    args = dict(max_batch=2, max_model_len=96, block_tokens=16, max_num_batched_tokens=23)
    args.update(kw)
    return Engine(model, **args)


def _run_all_logits(engine, prompts, params):
    """Drive the engine with logits="all"; returns per request (token ids fed, logits [n, V])."""
    ids = [engine.add_request(p, params) for p in prompts]
    fed = {rid: [] for rid in ids}
    while engine.has_unfinished():
        for out in engine.step(logits="all"):
            fed[out.request_id].append(out.logits.clone())
    return ids, {rid: torch.cat(v) for rid, v in fed.items()}


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.filterwarnings("ignore:dsv4. this build's CUDA")
def test_runtime_logits_equal_model_logits(model, path):
    """3 requests, 2 slots (the third joins when the first leaves), budget 23 tokens (prompts
    split in odd chunks, chunks mixed with decode tokens), blocks of 16 tokens taken from a
    pool where the freed blocks of finished requests are reused out of order."""
    prompts = random_prompts([37, 5, 50], seed=1)
    engine = _engine(model)
    params = SamplingParams(max_new_tokens=7, eos_token_id=-1)
    ids, logits = _run_all_logits(engine, prompts, params)
    with torch.no_grad():
        for rid, prompt in zip(ids, prompts):
            n = logits[rid].shape[0]
            assert n == len(prompt) + 6                     # the last sampled token is not fed
            seq = prompt + logits[rid][len(prompt) - 1:].argmax(-1)[:-1].tolist()
            ref = model(torch.tensor([seq]))[0]
            assert _rel(logits[rid], ref) < 1e-5, (rid, _rel(logits[rid], ref))
    assert engine.cache.blocks.num_free == engine.cache.num_blocks
    assert engine.cache.num_free_slots == 2
    if path == "kernels-without-paged-ops":
        import dsv4.layers.compressor as compressor
        assert set(compressor._PAGED_MISSING) == {"compress_kv", "indexer_topk"}


@pytest.mark.filterwarnings("ignore:dsv4. this build's CUDA")
def test_greedy_tokens_do_not_depend_on_neighbours(model, path):
    target = random_prompts([29], seed=2)[0]
    params = SamplingParams(max_new_tokens=6, eos_token_id=-1)
    alone = _engine(model).generate([target], params)[0]
    others = random_prompts([3, 41, 17], seed=3)
    crowd = _engine(model, max_batch=3, max_num_batched_tokens=16).generate(
        others[:1] + [target] + others[1:], params)
    assert crowd[1] == alone
    assert alone == reference_generate(model, target, 6, eos_id=None).token_ids


def test_seeded_sampling_is_per_request_and_matches_the_reference_loop(model):
    p = random_prompts([12], seed=4)[0]
    sp = SamplingParams(max_new_tokens=5, temperature=0.8, top_k=50, top_p=0.9, seed=123,
                        eos_token_id=-1)
    alone = _engine(model).generate([p], sp)[0]
    mixed = _engine(model, max_batch=3).generate(
        [random_prompts([9], seed=5)[0], p, p],
        [SamplingParams(max_new_tokens=5, temperature=1.0, seed=7, eos_token_id=-1), sp,
         SamplingParams(max_new_tokens=5, eos_token_id=-1)])
    assert mixed[1] == alone
    ref = reference_generate(model, p, 5, temperature=0.8, top_k=50, top_p=0.9, seed=123,
                             eos_id=None)
    assert alone == ref.token_ids


def test_stop_conditions_and_abort(model):
    p = random_prompts([10], seed=6)[0]
    greedy = _engine(model).generate([p], SamplingParams(max_new_tokens=4, eos_token_id=-1))[0]
    e = _engine(model)
    a = e.add_request(p, SamplingParams(max_new_tokens=4, eos_token_id=greedy[2]))
    b = e.add_request(p, SamplingParams(max_new_tokens=4, eos_token_id=-1,
                                        stop_token_ids=(greedy[1],)))
    final = {o.request_id: o for o in e.stream() if o.finished}
    assert final[a].finish_reason == "eos" and final[a].token_ids == greedy[:2]
    assert final[b].finish_reason == "stop" and final[b].token_ids == greedy[:2]
    c = e.add_request(p, SamplingParams(max_new_tokens=4, eos_token_id=-1))
    e.step()
    e.abort(c)
    assert not e.has_unfinished() and e.cache.num_free_slots == 2
    assert e.cache.blocks.num_free == e.cache.num_blocks


def test_admission_errors_leave_the_batch_alone(model):
    e = _engine(model, num_blocks=4)            # 4 blocks of 16 tokens
    p = random_prompts([20], seed=7)[0]
    rid = e.add_request(p, SamplingParams(max_new_tokens=3, eos_token_id=-1))
    e.step()
    with pytest.raises(ValueError, match="exceeds max_model_len 96"):
        e.add_request([1] * 90, SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match="needs 5 blocks of 16 tokens .* pool holds 4"):
        e.add_request([1] * 70, SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="token ids in"):
        e.add_request([V], SamplingParams())
    with pytest.raises(ValueError, match="empty prompt"):
        e.add_request([], SamplingParams())
    assert list(e.requests) == [rid] and len(e.scheduler.waiting) == 0
    out = [o for o in e.stream()]
    assert out[-1].finished and out[-1].token_ids == _engine(model).generate(
        [p], SamplingParams(max_new_tokens=3, eos_token_id=-1))[0]


class Boom(Exception):
    pass


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("layer", range(4))
def test_exception_in_a_layer_fails_only_that_steps_requests(model, layer, overlap, monkeypatch):
    """A layer raises in the step after a prefill: that step's requests fail (slots and blocks
    freed); a waiting request then runs to the synchronous loop's tokens. With the overlapped
    loop the prefill is still in flight when the failing step is launched: its outputs
    (discarded: their requests failed) do not come back."""
    e = _engine(model, max_batch=2, overlap=overlap)
    p = random_prompts([11, 13, 9], seed=8)
    params = SamplingParams(max_new_tokens=3, eos_token_id=-1)
    a, b = e.add_request(p[0], params), e.add_request(p[1], params)
    first = e.step()
    if overlap:
        assert first == []                          # the prefill of a and b, in flight
    c = e.add_request(p[2], params)                 # waiting: no slot
    blk = model.layers[layer]

    def boom(*args, **kw):
        raise Boom("injected")
    monkeypatch.setattr(blk, "forward", boom)
    with pytest.raises(EngineStepError, match="injected") as err:
        e.step()
    monkeypatch.undo()
    assert set(err.value.request_ids) == {a, b}
    assert e.cache.num_free_slots == 2 and e.cache.blocks.num_free == e.cache.num_blocks
    final = [o for o in e.stream() if o.finished]
    assert [o.request_id for o in final] == [c]
    assert final[0].token_ids == _engine(model).generate([p[2]], params)[0]


TESTDATA = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "testdata")


@pytest.mark.skipif(not os.path.isdir(TESTDATA), reason="golden cases not found")
@pytest.mark.parametrize("name,quant_sim,weights", [("golden_quant", False, "dequant"),
                                                    ("golden_fp8", True, "native")])
@pytest.mark.filterwarnings("ignore:dsv4. this build's CUDA")
def test_golden_logits_through_the_engine(name, quant_sim, weights, path):
    from safetensors.torch import load_file
    g = load_file(os.path.join(TESTDATA, name, "golden.safetensors"))
    m = dsv4.Model.from_pretrained(os.path.join(TESTDATA, name), dtype=torch.float32,
                                   quant_sim=quant_sim, weights=weights, progress=False)
    ref = g["logits_quant_sim" if quant_sim else "logits_exact"]
    ids = g["input_ids"]
    e = Engine(m, max_batch=2, max_model_len=48, block_tokens=8, max_num_batched_tokens=9)
    rids, logits = _run_all_logits(e, [row.tolist() for row in ids],
                                   SamplingParams(max_new_tokens=1, eos_token_id=-1))
    for b, rid in enumerate(rids):
        err = (logits[rid] - ref[b]).abs().amax(-1) / ref.abs().max()
        if quant_sim:
            assert err.max() < 2e-3 and (err < 1e-5).float().mean() > 0.5, err
        else:
            assert err.max() < 1e-5, err.max()


def test_bf16_kernel_path_decode_matches_the_reference_path(model, monkeypatch):
    """bf16 (the kernels' dtype): decode steps write the window ring inside kv_norm_rope;
    the forced kernel path (CPU references of the ops) agrees with the per-sequence reference
    path over prefill + decode. Both run the same reference ops on the CPU, so the logits
    are equal (0.0 measured); the bound, about one bf16 rounding step of the largest logit,
    leaves room for a BLAS that orders its sums differently per shape, far below what a
    RoPE position off by one in the decode branch gives (0.98; the bound was 3e-2)."""
    m16 = dsv4.Model(model.config).eval()
    m16.load_state_dict(model.state_dict())
    m16 = m16.to(torch.bfloat16)
    prompts = random_prompts([21, 6], seed=9)
    params = SamplingParams(max_new_tokens=5, eos_token_id=-1)
    got = {}
    for path in ("reference", "kernels"):
        if path == "kernels":
            monkeypatch.setattr(attention, "use_kernels",
                                lambda x, ops, unsupported=None: True)
        e = _engine(m16, max_num_batched_tokens=64)
        ids, logits = _run_all_logits(e, prompts, params)
        got[path] = [logits[i] for i in ids]
    for a, b in zip(got["kernels"], got["reference"]):
        assert a.shape == b.shape
        assert _rel(a, b) < 5e-3, _rel(a, b)


@pytest.mark.parametrize("route", ["reference", "kernels"])
def test_fp8_indexer_keys_change_nothing_under_quant_sim(route, monkeypatch):
    """quant_sim FP4-simulates the indexer keys; stored in FP8 (132-byte layout) they come
    back exactly, so the logits equal those of the bf16 key cache."""
    torch.manual_seed(0)
    m = dsv4.Model(dsv4.ModelConfig.tiny(quant_sim=True)).eval().to(torch.bfloat16)
    if route == "kernels":
        monkeypatch.setattr(attention, "use_kernels", lambda x, ops, unsupported=None: True)
    prompts = random_prompts([45, 9], seed=10)
    params = SamplingParams(max_new_tokens=4, eos_token_id=-1)
    out = {}
    for fmt in ("bf16", "fp8"):
        e = _engine(m, indexer_cache=fmt)
        assert (e.cache.layers[1].indexer.entries.dtype == torch.uint8) == (fmt == "fp8")
        ids, logits = _run_all_logits(e, prompts, params)
        out[fmt] = [logits[i] for i in ids]
    for a, b in zip(out["fp8"], out["bf16"]):
        assert a.shape == b.shape and _rel(a, b) < 1e-6, _rel(a, b)


# --------------------------------------------------------------------------- FP8 attention KV
@pytest.fixture(scope="module")
def model512():
    """bf16 tiny model at the release's attention head (head_dim 512, rope 64: the MODEL1
    layout's) with quant_sim, whose keys are FP8-simulated in the FP8 cache's own 64-blocks."""
    torch.manual_seed(0)
    m = dsv4.Model(dsv4.ModelConfig.tiny(head_dim=512, quant_sim=True)).eval()
    return m.to(torch.bfloat16)


@pytest.mark.parametrize("route", ["reference", "kernels"])
def test_fp8_kv_cache_changes_nothing_under_quant_sim(model512, route, monkeypatch):
    """kv_cache="fp8" (window rings and CSA / HCA entries in the 584-byte MODEL1 layout, the
    step's new keys packed before attention): the logits EQUAL those of the bf16 KV cache,
    bit for bit, because quant_sim already rounds the nope dims to e4m3 in the same blocks of
    64 and the RoPE dims are bf16. 3 requests in 2 slots (the third joins when one leaves),
    chunked prefill under a 23-token budget, steps mixing prompt chunks with decode tokens,
    pure decode steps (the ring written inside kv_norm_rope), blocks of 16 tokens reused.
    Also with FP8 indexer keys on top (both FP8 stores of the release)."""
    if route == "kernels":
        monkeypatch.setattr(attention, "use_kernels", lambda x, ops, unsupported=None: True)
    prompts = random_prompts([37, 5, 30], seed=11)
    params = SamplingParams(max_new_tokens=4, eos_token_id=-1)
    out = {}
    for kv, idx in (("bf16", "bf16"), ("fp8", "bf16"), ("fp8", "fp8")):
        e = _engine(model512, kv_cache=kv, indexer_cache=idx)
        layers = e.cache.layers
        assert all((lc.window.dtype == torch.uint8) == (kv == "fp8") for lc in layers)
        assert (layers[1].compressor.entries.dtype == torch.uint8) == (kv == "fp8")
        assert (layers[2].compressor.entries.dtype == torch.uint8) == (kv == "fp8")
        ids, logits = _run_all_logits(e, prompts, params)
        out[kv, idx] = [logits[i] for i in ids]
        assert e.cache.blocks.num_free == e.cache.num_blocks
    for fmt in (("fp8", "bf16"), ("fp8", "fp8")):
        for a, b in zip(out[fmt], out["bf16", "bf16"]):
            assert a.shape == b.shape and torch.equal(a, b), (fmt, _rel(a, b))


def test_fp8_kv_cache_kernel_path_matches_reference_path():
    """Without quant_sim the FP8 cache is an approximation (e4m3 nope dims); both layer paths
    must make the same one: the kernel path packs the step's new keys with kv_norm_rope, the
    reference path round-trips them through kv_cache.pack / unpack, both read the stores
    dequantised. Prompt positions only (greedy continuations could drift apart); measured
    equal on the CPU (< 1e-3 asserted; a path that skips packing its new keys is off by
    0.14-0.38); and the cache really changes the logits (0.26-0.38 from the bf16 cache).
    With one intra-op thread: with two, the CPU kernels of the two paths' different ops split
    their reductions differently, some bf16 roundings then land on the other side of an FP8
    step, and the logits differ by 2.8e-3 (a 2-core AMD EPYC, 2026-12-06)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _fp8_kernel_vs_reference_paths()
    finally:
        torch.set_num_threads(threads)


def _fp8_kernel_vs_reference_paths():
    torch.manual_seed(0)
    m = dsv4.Model(dsv4.ModelConfig.tiny(head_dim=512, quant_sim=False)).eval()
    m = m.to(torch.bfloat16)
    prompts = random_prompts([40, 19], seed=12)
    params = SamplingParams(max_new_tokens=1, eos_token_id=-1)
    got = {}
    for route in ("reference", "kernels"):
        with pytest.MonkeyPatch.context() as mp:
            if route == "kernels":
                mp.setattr(attention, "use_kernels", lambda x, ops, unsupported=None: True)
            for kv in ("fp8", "bf16"):
                ids, logits = _run_all_logits(_engine(m, kv_cache=kv), prompts, params)
                got[route, kv] = [logits[i] for i in ids]
    for a, b, c in zip(got["kernels", "fp8"], got["reference", "fp8"], got["reference", "bf16"]):
        assert a.shape == b.shape == c.shape
        assert _rel(a, b) < 1e-3, _rel(a, b)
        assert _rel(b, c) > 3e-2, _rel(b, c)


def test_fp8_kv_cache_through_preemption(model512, monkeypatch):
    """A short pool preempts the younger request, whose slot (FP8 ring) and blocks (FP8
    entries) are freed and later recomputed: its tokens equal those of an engine with room
    for both, and those of the bf16 cache on the same schedule (kernel path)."""
    from dsv4.runtime.scheduler import Scheduler
    monkeypatch.setattr(attention, "use_kernels", lambda x, ops, unsupported=None: True)
    preempted = []
    real = Scheduler._preempt

    def spy(self, req):
        preempted.append(req.request_id)
        return real(self, req)

    monkeypatch.setattr(Scheduler, "_preempt", spy)
    prompts = random_prompts([16, 30], seed=13)
    params = SamplingParams(max_new_tokens=4, eos_token_id=-1)
    short = dict(max_model_len=48, num_blocks=3, max_num_batched_tokens=64)
    tokens = {}
    for kv, kw in (("fp8", short), ("bf16", short), ("fp8", {})):
        n = len(preempted)
        tokens[kv, bool(kw)] = _engine(model512, kv_cache=kv, **kw).generate(prompts, params)
        assert (len(preempted) > n) == bool(kw), preempted
    assert tokens["fp8", True] == tokens["fp8", False] == tokens["bf16", True]


def test_fp8_kv_cache_refused_at_construction(model):
    """The MODEL1 layout takes head_dim 512: another model is refused when the Engine is
    built, with the reason, not in a step."""
    with pytest.raises(ValueError, match="head_dim 512"):
        _engine(model, kv_cache="fp8")
    with pytest.raises(ValueError, match="kv_cache must be"):
        _engine(model, kv_cache="float8")


class _GlueContract:
    """torch.ops.dsv4 with the CUDA glue's checks on FP8 pools (csrc/torch/sparse_attn.cpp,
    qkv_rope.cpp, compress_kv.cpp) applied before the CPU reference runs: MODEL1 pools of
    dsv4.ops.kv_cache.allocate (row stride 584, unit last stride, block stride a multiple of
    16 holding a block, 16-byte aligned), both attention scopes FP8, contiguous int32 rows."""

    def __init__(self):
        self.seen = []

    @staticmethod
    def _pool(t):
        nb, bs, eb = t.shape
        assert eb == 584 and t.stride(2) == 1 and (bs <= 1 or t.stride(1) == 584)
        assert nb <= 1 or (t.stride(0) % 16 == 0 and t.stride(0) >= bs * 584)
        assert t.data_ptr() % 16 == 0

    def __getattr__(self, name):
        op = getattr(torch.ops.dsv4, name)

        def call(*args, **kw):
            u8 = [a for a in args if isinstance(a, torch.Tensor) and a.dtype == torch.uint8]
            for t in u8:
                self._pool(t)
            if name in ("sparse_attn", "hca_attn"):
                kv, extra = args[1], args[6] if len(args) > 6 else None
                assert kv.dtype == torch.uint8 and (extra is None or extra.dtype == torch.uint8)
            if name == "kv_norm_rope":
                for c, rows in zip(args[6::2], args[7::2]):
                    if c is not None:
                        assert rows.dtype == torch.int32 and rows.is_contiguous()
                        assert rows.shape == (args[0].shape[0],)
            self.seen.append((name, len(u8)))
            return op(*args, **kw)
        return call


def test_fp8_kernel_path_arguments_meet_the_cuda_glue(model512, monkeypatch):
    """What the kernel path hands the ops with kv_cache="fp8" passes the CUDA glue's checks
    (the GPU itself is verified by tests/runtime/test_engine_cuda.py): prefill (ring copy +
    packed new keys, ring written in the same kv_norm_rope launch) and decode (ring in place),
    CSA (sparse_attn, FP8 extra pool) and HCA (hca_attn) and SWA layers."""
    glue = _GlueContract()
    monkeypatch.setattr(attention, "use_kernels", lambda x, ops, unsupported=None: True)
    monkeypatch.setattr(attention, "_dsv4", glue)
    import dsv4.layers.compressor as compressor
    monkeypatch.setattr(compressor, "_dsv4", glue)
    _engine(model512, kv_cache="fp8").generate(random_prompts([21, 3], seed=14),
                                                SamplingParams(max_new_tokens=3, eos_token_id=-1))
    names = {n for n, k in glue.seen if k}
    assert {"sparse_attn", "hca_attn", "kv_norm_rope", "compress_kv"} <= names
    # prefill: kv_norm_rope writes two FP8 pools (scope + ring); decode: one (the ring)
    assert {k for n, k in glue.seen if n == "kv_norm_rope"} == {1, 2}


def test_an_output_keeps_the_tokens_of_its_step(model):
    """RequestOutput.token_ids is built when read (a step copies nothing): an output read after
    later steps still holds the tokens of its own step, and equals a list."""
    from dsv4.runtime.request import RequestOutput, TokenPrefix
    eng = _engine(model)
    eng.add_request([1, 2, 3], SamplingParams(max_new_tokens=5, eos_token_id=-1))
    outs = []
    while eng.has_unfinished():
        outs += eng.step()                                  # read only after the last step
    final = outs[-1].token_ids
    assert len(final) == 5
    assert [o.token_ids for o in outs] == [final[:k] for k in range(1, 6)]
    assert [o.new_token_ids for o in outs] == [[t] for t in final]
    toks = [5, 6]
    out = RequestOutput("r", [6], TokenPrefix(toks, 2), False)
    toks.append(7)
    assert out.token_ids == [5, 6] and isinstance(out.token_ids, list)
    assert out == RequestOutput("r", [6], [5, 6], False)
    assert "token_ids=[5, 6]" in repr(out)
