"""The runtime engine (``dsv4.runtime.Engine``, ``dsv4.runtime.generate``) on an expert-parallel
model, 2 CPU processes (gloo): each rank runs its own requests (different counts and lengths,
a rank that finishes early, a rank with none, a rank idle for a few steps before its request
arrives) and its greedy fp32 tokens equal those of the reference loop
``dsv4.generate.generate`` on the single-process model, prompt by prompt. The engine keeps the
ranks in step by itself: an idle ``step()`` serves the others' exchanges, ``generate`` serves
until every rank is done, CUDA graphs are off.

A wrong expert, a skipped or doubled exchange or a rank out of step gives other tokens, a
RuntimeError ("out of step") or a deadlock (the harness times out).
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings

import pytest
import torch

from dsv4.config import ModelConfig
from dsv4.distributed import ExpertParallelGroup, expert_parallel, is_expert_parallel, serve
from dsv4.generate import generate as reference_generate
from dsv4.model import Model
from dsv4.runtime import Engine, SamplingParams
from dsv4.runtime import generate as runtime_generate
from dsv4.runtime.engine import EP_GRAPHS_OFF

from _ep_harness import free_port, run_ranks

CFG = ModelConfig.tiny(vocab_size=512)
SEED = 11
LENS = [9, 5, 12, 7, 3]               # prompt lengths of P0..P4
NEW = [4, 2, 3, 2, 3]                 # greedy tokens each generates
ENGINE = dict(max_batch=4, max_model_len=32)


def _prompts():
    g = torch.Generator().manual_seed(SEED)
    return [torch.randint(2, CFG.vocab_size, (n,), generator=g).tolist() for n in LENS]


def _params(p):
    return SamplingParams(max_new_tokens=NEW[p], eos_token_id=-1)     # greedy, no EOS


@pytest.fixture(scope="module")
def reference():
    """Greedy tokens of each prompt from the reference loop on the single-process model."""
    torch.manual_seed(SEED)
    model = Model(CFG)
    prompts = _prompts()
    with torch.no_grad():
        return [reference_generate(model, prompts[p], NEW[p], eos_id=None).token_ids
                for p in range(len(LENS))]


def _ep_model():
    torch.manual_seed(SEED)
    return expert_parallel(Model(CFG), ExpertParallelGroup.current())


# ---------------------------------------------------------------------- Engine.generate
# rank -> its prompts: rank 1 has fewer and shorter requests (done first, then serves), or none
GENERATE_PLANS = {"fewer": {0: [0, 2, 4], 1: [3]}, "none": {0: [0, 1, 2, 3], 1: []}}


def _generate_rank(rank, world, plan, ref):
    model = _ep_model()
    mine = GENERATE_PLANS[plan][rank]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = Engine(model, cuda_graphs=True, **ENGINE)
    assert engine.runner.graph_off_reason == EP_GRAPHS_OFF
    assert [str(w.message) for w in caught] == [
        f"dsv4.runtime: cuda_graphs=True ignored: {EP_GRAPHS_OFF}"]
    prompts = _prompts()
    got = engine.generate([prompts[p] for p in mine], [_params(p) for p in mine])
    assert got == [ref[p] for p in mine], (rank, mine)
    assert not engine.has_unfinished() and not engine.requests
    assert serve(model) == 0            # generate left every rank at the same point


@pytest.mark.parametrize("plan", sorted(GENERATE_PLANS))
def test_engine_generate_per_rank_equals_single_process(plan, reference):
    run_ranks(2, _generate_rank, plan, reference)


# ---------------------------------------------------------------------- step() by hand
STEPS = 8            # every request below is done by then (prefill + NEW tokens, one a step)
ADDS = {0: {0: [0, 1], 3: [2]}, 1: {2: [4]}}     # rank -> step -> prompts added then


def _step_rank(rank, world, ref):
    model = _ep_model()
    engine = Engine(model, **ENGINE)
    prompts = _prompts()
    rid_of, tokens, idle = {}, {}, []
    for step in range(STEPS):
        for p in ADDS[rank].get(step, []):
            rid_of[engine.add_request(prompts[p], _params(p))] = p
        busy = engine.has_unfinished()
        outs = engine.step()            # an idle rank serves the other rank's step here
        if not busy:
            idle.append(step)
            assert outs == []
        for o in outs:
            tokens.setdefault(rid_of[o.request_id], []).extend(o.new_token_ids)
    assert not engine.has_unfinished()
    assert serve(model) == 0            # both ranks made STEPS steps: they leave together
    want_idle = {0: [6, 7], 1: [0, 1, 5, 6, 7]}[rank]
    assert idle == want_idle, idle
    assert tokens == {p: ref[p] for ps in ADDS[rank].values() for p in ps}, rank


def test_engine_steps_with_idle_rank_equal_single_process(reference):
    run_ranks(2, _step_rank, reference)


# ---------------------------------------------------------------------- dsv4.runtime.generate
def _runtime_generate_rank(rank, world, ref):
    """Rank 0 generates P2, rank 1 nothing (max_new_tokens 0), then both serve, as
    ``torchrun ... dsv4 generate`` does; then rank 0 stops P0 at its second token (an EOS id)
    while rank 1 still generates P2."""
    model = _ep_model()
    prompts = _prompts()
    if rank == 0:
        res = runtime_generate(model, prompts[2], NEW[2], eos_id=None, **ENGINE)
        assert res.token_ids == ref[2]
    else:
        res = runtime_generate(model, prompts[1], 0, eos_id=None)
        assert res.token_ids == [] and res.new_tokens == 0
    assert serve(model) == 0
    if rank == 0:
        res = runtime_generate(model, prompts[0], NEW[0], eos_id=ref[0][1], **ENGINE)
        assert res.token_ids == ref[0][:1] and res.finish_reason == "eos"
    else:
        res = runtime_generate(model, prompts[2], NEW[2], eos_id=None, **ENGINE)
        assert res.token_ids == ref[2]
    assert serve(model) == 0


def test_runtime_generate_per_rank_equals_single_process(reference):
    if reference[0][1] in reference[0][:1]:
        pytest.skip("P0's second token repeats its first (the EOS stop would come earlier)")
    run_ranks(2, _runtime_generate_rank, reference)


# ---------------------------------------------------------------------- a rank that fails
def _failing_rank(rank, world, ref):
    """Rank 1's generate raises (a prompt outside the vocabulary) before its first step: it
    serves rank 0 until rank 0 is done, then re-raises; rank 0's tokens are unaffected."""
    model = _ep_model()
    engine = Engine(model, **ENGINE)
    prompts = _prompts()
    if rank == 0:
        assert engine.generate([prompts[0], prompts[3]], [_params(0), _params(3)]) == \
            [ref[0], ref[3]]
    else:
        with pytest.raises(ValueError, match="token ids in"):
            engine.generate([[CFG.vocab_size + 5]])
        assert not engine.requests
    assert serve(model) == 0


def test_a_failing_rank_keeps_serving_the_others(reference):
    run_ranks(2, _failing_rank, reference)


# ---------------------------------------------------------------------- the command line
ARGV = ["generate", "--model", "tiny", "--prompt", "def fibonacci(n):", "--max-new-tokens", "3",
        "--device", "cpu"]


def _cli_rank(rank, world, port, out_dir):
    """``torchrun ... dsv4 generate`` with the GPU's loop (``dsv4.runtime.generate``, which the
    command runs on CUDA) swapped in for the CPU's reference loop, as torchrun would start it."""
    import dsv4.generate
    from dsv4 import cli
    from dsv4.runtime.generate import generate as engine_loop
    calls = []

    def loop(model, prompt_ids, max_new_tokens, **kw):
        calls.append((is_expert_parallel(model), max_new_tokens))
        return engine_loop(model, prompt_ids, max_new_tokens, **kw)

    dsv4.generate.generate = loop                 # this forked rank only
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(ARGV)
    assert rc == 0, err.getvalue()
    assert calls == [(True, 3 if rank == 0 else 0)]     # rank 0 generates, rank 1 serves
    with open(os.path.join(out_dir, f"rank{rank}.out"), "w") as f:
        f.write(out.getvalue())


def test_cli_generate_across_two_processes_on_the_engine(tmp_path, capsys):
    from dsv4 import cli
    assert cli.main(ARGV) == 0          # single process, the reference loop
    single = capsys.readouterr().out
    run_ranks(2, _cli_rank, free_port(), str(tmp_path), init=False)
    assert (tmp_path / "rank0.out").read_text() == single
    assert (tmp_path / "rank1.out").read_text() == ""


def test_single_process_engine_is_not_expert_parallel():
    torch.manual_seed(SEED)
    model = Model(CFG)
    assert not is_expert_parallel(model)
    engine = Engine(model, **ENGINE)
    assert engine._ep is False and engine.runner.graph_off_reason != EP_GRAPHS_OFF
    assert engine.step() == []          # nothing to run: no collective, returns at once

