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

V = 129280


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return dsv4.Model(dsv4.ModelConfig.tiny(quant_sim=False)).eval()


class _NoPagedOps:
    """torch.ops.dsv4 as a build whose CUDA kernels reject paged arguments (contracts.md §A
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


def _prompts(seed, lens):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lens]


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
    prompts = _prompts(1, [37, 5, 50])
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
    target = _prompts(2, [29])[0]
    params = SamplingParams(max_new_tokens=6, eos_token_id=-1)
    alone = _engine(model).generate([target], params)[0]
    others = _prompts(3, [3, 41, 17])
    crowd = _engine(model, max_batch=3, max_num_batched_tokens=16).generate(
        others[:1] + [target] + others[1:], params)
    assert crowd[1] == alone
    assert alone == reference_generate(model, target, 6, eos_id=None).token_ids


def test_seeded_sampling_is_per_request_and_matches_the_reference_loop(model):
    p = _prompts(4, [12])[0]
    sp = SamplingParams(max_new_tokens=5, temperature=0.8, top_k=50, top_p=0.9, seed=123,
                        eos_token_id=-1)
    alone = _engine(model).generate([p], sp)[0]
    mixed = _engine(model, max_batch=3).generate(
        [_prompts(5, [9])[0], p, p],
        [SamplingParams(max_new_tokens=5, temperature=1.0, seed=7, eos_token_id=-1), sp,
         SamplingParams(max_new_tokens=5, eos_token_id=-1)])
    assert mixed[1] == alone
    ref = reference_generate(model, p, 5, temperature=0.8, top_k=50, top_p=0.9, seed=123,
                             eos_id=None)
    assert alone == ref.token_ids


def test_stop_conditions_and_abort(model):
    p = _prompts(6, [10])[0]
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
    p = _prompts(7, [20])[0]
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


@pytest.mark.parametrize("layer", range(4))
def test_exception_in_a_layer_fails_only_that_steps_requests(model, layer, monkeypatch):
    e = _engine(model, max_batch=2)
    p = _prompts(8, [11, 13, 9])
    params = SamplingParams(max_new_tokens=3, eos_token_id=-1)
    a, b = e.add_request(p[0], params), e.add_request(p[1], params)
    e.step()
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
    path to bf16 rounding over prefill + decode."""
    m16 = dsv4.Model(model.config).eval()
    m16.load_state_dict(model.state_dict())
    m16 = m16.to(torch.bfloat16)
    prompts = _prompts(9, [21, 6])
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
        assert _rel(a, b) < 3e-2, _rel(a, b)


@pytest.mark.parametrize("route", ["reference", "kernels"])
def test_fp8_indexer_keys_change_nothing_under_quant_sim(route, monkeypatch):
    """quant_sim FP4-simulates the indexer keys; stored in FP8 (132-byte layout) they come
    back exactly, so the logits equal those of the bf16 key cache."""
    torch.manual_seed(0)
    m = dsv4.Model(dsv4.ModelConfig.tiny(quant_sim=True)).eval().to(torch.bfloat16)
    if route == "kernels":
        monkeypatch.setattr(attention, "use_kernels", lambda x, ops, unsupported=None: True)
    prompts = _prompts(10, [45, 9])
    params = SamplingParams(max_new_tokens=4, eos_token_id=-1)
    out = {}
    for fmt in ("bf16", "fp8"):
        e = _engine(m, indexer_cache=fmt)
        assert (e.cache.layers[1].indexer.entries.dtype == torch.uint8) == (fmt == "fp8")
        ids, logits = _run_all_logits(e, prompts, params)
        out[fmt] = [logits[i] for i in ids]
    for a, b in zip(out["fp8"], out["bf16"]):
        assert a.shape == b.shape and _rel(a, b) < 1e-6, _rel(a, b)
