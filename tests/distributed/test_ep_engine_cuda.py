"""The runtime engine on an expert-parallel model on two GPUs (NCCL; ``nvidia-h200-x2``;
skipped elsewhere), the GPU twin of test_ep_engine.py.

fp32 (the reference path on the GPU): each rank's per-rank engines (fewer requests, none, idle
then joining) give the greedy tokens of the reference loop on a single-GPU fp32 model. bf16
(the kernels): per-rank engines finish (no deadlock: before the engine turned CUDA graphs off
for an expert-parallel model, its capture warm-up ran the model on one rank alone) with graphs
off and the reason recorded, and ``torchrun --nproc-per-node 2 -m dsv4 generate`` in bf16
(the command's GPU loop, ``dsv4.runtime.generate``) exits 0 and prints the prompt and 8 tokens.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from dsv4.distributed import ExpertParallelGroup, expert_parallel, serve
from dsv4.model import Model

from _ep_harness import run_dsv4_cli, run_ranks

pytestmark = pytest.mark.cuda
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs "
                              "(nvidia-h200-x2)")


def _engines_on_two_gpus(rank, world, dtype_name):
    from test_ep_engine import ADDS, CFG, ENGINE, GENERATE_PLANS, NEW, SEED, STEPS, _params, \
        _prompts
    from dsv4.generate import generate as reference_generate
    from dsv4.runtime import Engine
    from dsv4.runtime.engine import EP_GRAPHS_OFF
    dtype = getattr(torch, dtype_name)
    group = ExpertParallelGroup.current()
    dev = group.device
    prompts = _prompts()
    torch.manual_seed(SEED)
    ep = expert_parallel(Model(CFG).to(dtype=dtype), group)
    ref = None
    if dtype == torch.float32:
        torch.manual_seed(SEED)
        single = Model(CFG).to(dev)
        with torch.no_grad():
            ref = [reference_generate(single, prompts[p], NEW[p], eos_id=None).token_ids
                   for p in range(len(prompts))]
        del single
    for plan in sorted(GENERATE_PLANS):
        mine = GENERATE_PLANS[plan][rank]
        engine = Engine(ep, **ENGINE)
        assert engine.runner.graph_off_reason == EP_GRAPHS_OFF
        got = engine.generate([prompts[p] for p in mine], [_params(p) for p in mine])
        assert [len(t) for t in got] == [NEW[p] for p in mine]
        if ref is not None:
            assert got == [ref[p] for p in mine], (rank, plan)
        assert serve(ep) == 0
    engine = Engine(ep, **ENGINE)
    rid_of, tokens = {}, {}
    for step in range(STEPS):
        for p in ADDS[rank].get(step, []):
            rid_of[engine.add_request(prompts[p], _params(p))] = p
        for o in engine.step():
            tokens.setdefault(rid_of[o.request_id], []).extend(o.new_token_ids)
    assert not engine.has_unfinished()
    assert serve(ep) == 0
    assert sorted(tokens) == sorted(p for ps in ADDS[rank].values() for p in ps)
    if ref is not None:
        assert tokens == {p: ref[p] for p in tokens}, rank


@two_gpus
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_engines_on_two_gpus(dtype_name):
    run_ranks(2, _engines_on_two_gpus, dtype_name, backend="nccl")


@two_gpus
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="no torchrun on PATH")
def test_torchrun_generate_bf16_on_two_gpus():
    argv = ["generate", "--model", "tiny", "--prompt", "def fibonacci(n):", "--max-new-tokens",
            "8", "--device", "cuda", "--dtype", "bfloat16"]
    proc = run_dsv4_cli(argv, nproc=2)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("def fibonacci(n):")
    assert "new tokens: " in proc.stderr     # 8 unless the random model drew EOS first
