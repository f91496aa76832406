"""The runtime's public surface used wrongly (a new user's mistakes and a hostile caller's
inputs): every bad call is a ValueError / TypeError naming the argument and what is accepted,
and leaves the engine exactly as it was (nothing queued, nothing running, the pool full)."""

from __future__ import annotations

import pytest
import torch

import dsv4
from dsv4.runtime import Engine, SamplingParams
from dsv4.runtime.request import Status

from _runtime_common import V


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return dsv4.Model(dsv4.ModelConfig.tiny(quant_sim=False)).eval()


def _engine(model, **kw):
    args = dict(max_batch=2, max_model_len=48, block_tokens=16, max_num_batched_tokens=23)
    args.update(kw)
    return Engine(model, **args)


def _idle(e: Engine) -> bool:
    return (not e.requests and not e.has_unfinished()
            and e.cache.blocks.num_free == e.cache.num_blocks
            and e.cache.num_free_slots == e.max_batch)


P2 = SamplingParams(max_new_tokens=2, eos_token_id=-1)


def test_generate_with_one_bad_prompt_queues_nothing(model):
    e = _engine(model)
    with pytest.raises(ValueError, match=r"prompt_ids .* token ids in \[0, 129280\)"):
        e.generate([[1, 2], [3, V]], P2)
    with pytest.raises(ValueError, match="exceeds max_model_len 48"):
        e.generate([[1, 2], [3] * 40], [P2, SamplingParams(max_new_tokens=20)])
    assert _idle(e)
    assert e.generate([[5, 6]], P2) == _engine(model).generate([[5, 6]], P2)


def test_generate_refuses_a_busy_engine_instead_of_dropping_its_outputs(model):
    e = _engine(model)
    rid = e.add_request([7, 8, 9], P2)
    with pytest.raises(ValueError, match="1 request.* already added"):
        e.generate([[1, 2]], P2)
    assert list(e.requests) == [rid]
    final = [o for o in e.stream() if o.finished]
    assert [o.request_id for o in final] == [rid] and len(final[0].token_ids) == 2
    assert _idle(e)


def test_generate_interrupted_leaves_no_request_behind(model, monkeypatch):
    e = _engine(model, max_batch=1)
    calls = {"n": 0}
    real = e.step

    def step(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(e, "step", step)
    with pytest.raises(KeyboardInterrupt):
        e.generate([[1, 2], [3, 4]], P2)       # the second prompt is still waiting
    monkeypatch.undo()
    assert _idle(e)
    assert e.generate([[1, 2]], P2) == _engine(model).generate([[1, 2]], P2)


def test_generate_prompts_must_be_a_list_of_prompts(model):
    e = _engine(model)
    with pytest.raises(ValueError, match="prompts must be a sequence of prompts"):
        e.generate("hello", P2)
    with pytest.raises(ValueError, match="prompts must be a sequence of prompts"):
        e.generate([1, 2, 3], P2)
    with pytest.raises(ValueError, match="prompts must be a sequence of prompts"):
        e.generate(torch.tensor([1, 2, 3]), P2)
    assert _idle(e)
    assert e.generate(torch.tensor([[1, 2, 3]]), P2) == e.generate([[1, 2, 3]], P2)


@pytest.mark.parametrize("bad,hint", [
    ({"a": [1, 2], "b": [3]}, "unordered"), ({(1, 2), (3,)}, "unordered"),
    (frozenset({(1, 2)}), "unordered"), ("np0d", "got"), ("np1d", "flat"),
    ("npints", "flat"), ([torch.tensor(1), torch.tensor(2)], "flat")])
def test_generate_names_prompts_that_are_not_a_sequence_of_prompts(model, bad, hint):
    """What is not an ordered sequence of prompts: a dict or a set of prompts (the results come
    "in order", which a set has not; a dict gave "prompt_ids ...; got 'a'"), a numpy 0-d array
    (a bare TypeError), a flat numpy array or list of numpy / 0-d tensor ints (blamed one int
    as a prompt): each refused naming what is accepted, nothing queued."""
    np = pytest.importorskip("numpy")
    bad = {"np0d": np.array(3), "np1d": np.array([1, 2, 3]),
           "npints": [np.int64(1), np.int64(2)]}.get(bad, bad) if isinstance(bad, str) else bad
    e = _engine(model)
    with pytest.raises(ValueError, match=rf"^prompts must be a sequence of prompts .*{hint}"):
        e.generate(bad, P2)
    assert _idle(e)
    assert e.generate(np.array([[1, 2, 3]]), P2) == e.generate([[1, 2, 3]], P2)


@pytest.mark.parametrize("bad", [5, 1.5, b"x", ["a"], ""])
def test_request_id_must_be_a_non_empty_string(model, bad):
    e = _engine(model)
    with pytest.raises(ValueError, match="request_id must be a non-empty str or None"):
        e.add_request([1], P2, request_id=bad)
    assert _idle(e)


def test_generated_ids_never_collide_with_given_ids(model, monkeypatch):
    import itertools

    from dsv4.runtime import request as request_mod
    e = _engine(model)
    monkeypatch.setattr(request_mod, "_ids", itertools.count(0))
    taken = e.add_request([1], P2, request_id="req-2")   # the next generated name
    auto = e.add_request([2], P2)
    assert auto != taken and set(e.requests) == {taken, auto}
    final = {o.request_id: o for o in e.stream() if o.finished}
    assert set(final) == {taken, auto}


def test_sampling_params_name_their_argument():
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
        SamplingParams(temperature=1.0, seed=2 ** 64)
    SamplingParams(temperature=1.0, seed=2 ** 64 - 1)
    with pytest.raises(ValueError, match="stop_token_ids must be a sequence of token ids"):
        SamplingParams(stop_token_ids=5)
    with pytest.raises(ValueError, match="stop_token_ids must be a sequence of token ids"):
        SamplingParams(stop_token_ids="ab")
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)
    sp = SamplingParams(max_new_tokens=torch.tensor(3), temperature=1.0, seed=torch.tensor(5))
    assert type(sp.max_new_tokens) is int and type(sp.seed) is int     # stored as python ints
    assert (sp.max_new_tokens, sp.seed) == (3, 5)


@pytest.mark.parametrize("bad", ["np0d", torch.tensor(3), 3, None])
def test_stop_token_ids_scalar_is_named(bad):
    """A scalar (a numpy or torch 0-d array too: they have __iter__, and iterating them raised
    a bare TypeError) is not a sequence of stop ids: the ValueError names the field."""
    np = pytest.importorskip("numpy")
    bad = np.array(3) if isinstance(bad, str) else bad
    with pytest.raises(ValueError, match="stop_token_ids must be a sequence of token ids"):
        SamplingParams(stop_token_ids=bad)


def test_eos_and_stop_ids_must_be_token_ids(model):
    """eos_token_id -1 is "never"; below it, or (where the vocabulary is known: add_request)
    an id the model never samples, the stop was silently off. Refused, nothing queued; the
    unordered prompt containers of int_sequence too."""
    np = pytest.importorskip("numpy")
    for bad in (-2, -5, True, 1.0, "1"):
        with pytest.raises(ValueError, match=r"eos_token_id must be None \(the model config's\), "
                                             r"-1 \(never\) or a token id >= 0, got "):
            SamplingParams(eos_token_id=bad)
    assert SamplingParams(eos_token_id=np.int64(7)).eos_token_id == 7
    assert type(SamplingParams(eos_token_id=np.int64(7)).eos_token_id) is int
    sp = SamplingParams(temperature=np.float32(0.5), top_p=np.float64(0.75), top_k=np.int64(3))
    assert [(v, type(v)) for v in (sp.temperature, sp.top_p, sp.top_k)] == [
        (0.5, float), (0.75, float), (3, int)]
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        SamplingParams(temperature=True)
    e = _engine(model)
    with pytest.raises(ValueError, match=rf"params.eos_token_id must be -1 \(never\), None "
                                         rf"\(the config's\) or a token id in \[0, {V}\), got {V}"):
        e.add_request([1], SamplingParams(max_new_tokens=2, eos_token_id=V))
    with pytest.raises(ValueError, match=rf"params.stop_token_ids must be token ids in "
                                         rf"\[0, {V}\), got {V + 5}"):
        e.add_request([1], SamplingParams(max_new_tokens=2, stop_token_ids=[3, V + 5]))
    for bad in ({9, 3, 7}, frozenset({9, 3}), {9: 0, 3: 1}):
        with pytest.raises(ValueError, match=r"prompt_ids must be .* \(unordered: pass a list"):
            e.add_request(bad, P2)
    assert _idle(e)
    rid = e.add_request([1], SamplingParams(max_new_tokens=2, eos_token_id=V - 1,
                                            stop_token_ids=[V - 1]))
    assert set(e.requests) == {rid}


def test_huge_seed_is_refused_before_queueing(model):
    e = _engine(model)
    with pytest.raises(ValueError, match="seed"):
        e.add_request([1], SamplingParams(max_new_tokens=2, temperature=1.0, seed=2 ** 70))
    assert _idle(e)


def test_prompt_of_every_integer_dtype_and_container(model):
    """Lists, tuples, numpy arrays, int8/uint8/int32 tensors give the same tokens; float,
    bool, 2-D tensors and nested lists are refused by name."""
    np = pytest.importorskip("numpy")
    ref = _engine(model).generate([[1, 100, 3]], P2)[0]
    for p in ([1, 100, 3], (1, 100, 3), np.array([1, 100, 3]),
              torch.tensor([1, 100, 3], dtype=torch.int32),
              torch.tensor([1, 100, 3], dtype=torch.uint8),
              torch.tensor([1, 100, 3], dtype=torch.int8)):
        assert _engine(model).generate([p], P2)[0] == ref, type(p)
    e = _engine(model)
    for bad in (torch.tensor([1.0, 2.0]), torch.tensor([True]), torch.tensor([[1, 2]]),
                [[1, 2]], [1.0], np.array([1.0])):
        with pytest.raises(ValueError, match="prompt_ids must be"):
            e.add_request(bad, P2)
    assert _idle(e)


@pytest.mark.parametrize("limit", ["max_model_len", "pool"])
@pytest.mark.parametrize("total", [47, 48, 49])
def test_prompt_at_the_pool_size(model, total, limit):
    """48 tokens at most, by max_model_len 48 or by a pool of 3 blocks of 16 tokens (with
    max_model_len 96): prompt + max_new_tokens of 47 and 48 run to the end with the reference
    tokens; 49 is refused up front, naming the limit."""
    kw = dict(max_model_len=48) if limit == "max_model_len" else dict(max_model_len=96)
    e = _engine(model, max_batch=1, num_blocks=3, **kw)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, V, (total - 2,), generator=g).tolist()
    if total > 48:
        msg = ("exceeds max_model_len 48" if limit == "max_model_len" else
               "needs 4 blocks of 16 tokens .* the pool holds 3")
        with pytest.raises(ValueError, match=msg):
            e.add_request(prompt, P2)
        assert _idle(e)
        return
    out = e.generate([prompt], P2)[0]
    from dsv4.generate import generate as reference_generate
    assert out == reference_generate(model, prompt, 2, eos_id=None).token_ids
    assert _idle(e)


def test_engine_is_reusable_after_a_failed_step(model, monkeypatch):
    e = _engine(model)
    rid = e.add_request([1, 2, 3], P2)
    monkeypatch.setattr(model.layers[0], "forward", lambda *a, **k: 1 / 0)
    with pytest.raises(Exception, match="division by zero"):
        e.step()
    monkeypatch.undo()
    assert rid not in e.requests and _idle(e)
    assert e.step() == []                           # nothing left: a no-op step
    assert e.generate([[1, 2, 3]], P2) == _engine(model).generate([[1, 2, 3]], P2)


def test_abort_of_waiting_and_running_requests(model):
    e = _engine(model, max_batch=1)
    a = e.add_request([1, 2, 3], P2)
    b = e.add_request([4, 5, 6], P2)                # waits for the one slot
    e.step()
    assert e.requests[a].status == Status.RUNNING and e.requests[b].status == Status.WAITING
    e.abort(b)
    e.abort(a)
    assert _idle(e)
    with pytest.raises(KeyError, match="unknown request_id"):
        e.abort(a)


def test_a_cache_larger_than_the_device_is_refused_before_allocating(model, monkeypatch):
    """max_model_len 10M on the tiny model asks for ~66 GB of pool: a clear error up front,
    not a host OOM kill while the pool is zeroed."""
    from dsv4.runtime import engine as engine_mod
    from dsv4.runtime.pool import PagedCache
    monkeypatch.setattr(engine_mod, "_available_bytes", lambda device: 2 ** 30)
    monkeypatch.setattr(PagedCache, "__init__", lambda *a, **k: pytest.fail("allocated"))
    with pytest.raises(ValueError, match=r"needs 61\.99 GiB but cpu has 1\.00 GiB available; "
                       "lower max_batch, max_model_len or num_blocks"):
        Engine(model, max_batch=16, max_model_len=10 ** 7)
    monkeypatch.undo()
    assert engine_mod._available_bytes(torch.device("cpu")) > 0   # Linux: MemAvailable read
    monkeypatch.setattr(engine_mod, "_available_bytes", lambda device: 2 ** 30)
    _engine(model)                                  # a small cache still fits


def test_a_model_moved_after_the_engine_was_built_is_named(model):
    torch.manual_seed(0)
    m = dsv4.Model(dsv4.ModelConfig.tiny(quant_sim=False)).eval()
    m.load_state_dict(model.state_dict())
    e = _engine(m)
    rid = e.add_request([1, 2, 3], P2)
    m.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="the model is torch.bfloat16 on cpu but this "
                       "Engine's cache holds torch.float32 on cpu"):
        e.step()
    assert list(e.requests) == [rid] and e.requests[rid].status == Status.WAITING
    m.to(torch.float32)
    final = [o for o in e.stream() if o.finished]
    assert final[0].token_ids == _engine(model).generate([[1, 2, 3]], P2)[0]


def test_all_logits_are_returned_once_per_position_across_preemption(model):
    """Two 20-token prompts with 12 new tokens each in a 3-block pool (48 tokens): the younger
    request is preempted and recomputed. step(logits="all") returns each fed position's
    logits exactly once (20 + 11 rows per request, not the recomputed ones again), equal to
    the model's logits of the final sequence."""
    e = _engine(model, num_blocks=3, max_num_batched_tokens=64)
    sp = SamplingParams(max_new_tokens=12, eos_token_id=-1)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, V, (20,), generator=g).tolist() for _ in range(2)]
    ids = [e.add_request(p, sp) for p in prompts]
    got = {rid: [] for rid in ids}
    final = {}
    while e.has_unfinished():
        for o in e.step(logits="all"):
            got[o.request_id].append(o.logits)
            if o.finished:
                final[o.request_id] = o.token_ids
    assert e.runner.stats["eager_steps"] > 0
    with torch.no_grad():
        for rid, p in zip(ids, prompts):
            rows = torch.cat(got[rid])
            assert rows.shape[0] == 20 + 11, rows.shape
            ref = model(torch.tensor([p + final[rid][:-1]]))[0]
            assert (rows - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_cuda_graphs_must_be_a_bool(model):
    """"no" was truthy: it turned CUDA graphs on."""
    for bad in ("no", 0, 1.0):
        with pytest.raises(ValueError, match="cuda_graphs must be None"):
            _engine(model, cuda_graphs=bad)
    _engine(model, cuda_graphs=False)


def test_seeded_samples_survive_preemption(model, monkeypatch):
    """Sampled requests in a pool too small for all of them: the preempted ones are
    recomputed and still draw exactly the tokens they draw alone (their generator is not
    re-drawn for the tokens they already have)."""
    g = torch.Generator().manual_seed(12)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (18, 9, 25)]
    params = [SamplingParams(max_new_tokens=8, temperature=0.9, top_k=40, seed=s,
                             eos_token_id=-1) for s in (1, 2, 3)]
    alone = [_engine(model, max_batch=1).generate([p], sp)[0] for p, sp in zip(prompts, params)]
    e = _engine(model, max_batch=3, num_blocks=4, max_num_batched_tokens=9)
    preempted = []
    real = e.scheduler._preempt
    monkeypatch.setattr(e.scheduler, "_preempt", lambda r: (preempted.append(r.request_id),
                                                           real(r)))
    assert e.generate(prompts, params) == alone
    assert preempted
