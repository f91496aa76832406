"""Expert parallelism on GPUs with NCCL (run on the GPU machine; skipped elsewhere).

One GPU (``nvidia-h200``, gpu_check.sh): a group of one (NCCL all-to-all to itself) gives the
plain model's logits bit for bit on the kernel path, and CUDA-graph capture is refused with a
clear error. Two GPUs (``nvidia-h200-x2``): the layer cases of test_ep_moe.py on the bf16 MoE
kernels (bit-exact against the single-GPU layer, exact-arithmetic weights), the whole tiny model
on the schedule of test_ep_model.py against the single-GPU model (the 2x rule against the
fp32 model, as tests/test_model_cuda.py), a native FP8/FP4 checkpoint loaded by both ranks,
and ``torchrun --nproc-per-node 2 -m dsv4 generate`` printing the single-GPU text.
"""

from __future__ import annotations

import shutil

import pytest
import torch

import dsv4
from dsv4.distributed import (ExpertParallelGroup, ExpertParallelMoE, expert_parallel, serve,
                              serve_step)
from dsv4.model import Model

from _ep_harness import run_dsv4_cli, run_ranks

pytestmark = pytest.mark.cuda
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs "
                              "(nvidia-h200-x2)")


# ------------------------------------------------------------------------ one GPU
def _one_gpu_group(rank, world):
    from test_ep_model import CFG, SEED, STEPS, _feed, _inputs
    group = ExpertParallelGroup.current()
    assert group.device == torch.device("cuda", 0)
    torch.manual_seed(SEED)
    plain = Model(CFG).to("cuda", torch.bfloat16)
    torch.manual_seed(SEED)
    ep = expert_parallel(Model(CFG).to(dtype=torch.bfloat16), group)
    x = torch.randn(4, CFG.dim, device="cuda", dtype=torch.bfloat16)
    assert ep.layers[3].ffn.kernel_path_stack(x) is not None      # the MoE kernels run
    prompts, decodes = _inputs()
    seqs = [0, 1, 5]
    caches = [plain.make_cache(3), ep.make_cache(3)]
    with torch.no_grad():
        for step in range(STEPS):
            ids, lens = _feed(seqs, step, prompts, decodes)
            ids = ids.cuda()
            a, b = (m(ids, cache=c, seq_lens=lens) for m, c in zip((plain, ep), caches))
            assert torch.equal(a, b), (step, (a - b).abs().max().item())
        assert serve(ep) == 0


def test_group_of_one_gpu_is_bit_exact():
    run_ranks(1, _one_gpu_group, backend="nccl")


def test_cuda_graph_capture_is_refused():
    from test_ep_moe import LEARNED, _exact_moe
    group = ExpertParallelGroup(rank=0, world_size=1, device="cuda")
    moe = ExpertParallelMoE(_exact_moe(LEARNED, 0, torch.bfloat16, device="cuda"), group,
                            tag=LEARNED)
    x = torch.randn(4, moe.dim, device="cuda", dtype=torch.bfloat16)
    ids = torch.zeros(4, dtype=torch.long, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.graph(graph):
            moe(x, ids)


# ------------------------------------------------------------------------ two GPUs
def _layer_cases_nccl(rank, world):
    from test_ep_moe import layer_cases
    old = dsv4.get_backend()
    dsv4.set_backend("cuda")
    try:
        layer_cases(rank, world, torch.bfloat16)     # the MoE kernels
        layer_cases(rank, world, torch.float32)      # the reference path on the GPU
    finally:
        dsv4.set_backend(old)


@two_gpus
def test_layer_on_two_gpus_equals_single_gpu():
    run_ranks(2, _layer_cases_nccl, backend="nccl")


def _model_on_two_gpus(rank, world):
    from test_ep_model import CFG, PLANS, SEED, STEPS, _feed, _inputs
    group = ExpertParallelGroup.current()
    dev = group.device
    prompts, decodes = _inputs()
    seqs = PLANS[world][rank]
    torch.manual_seed(SEED)
    truth = Model(CFG).to(dev)                               # fp32: the reference path
    torch.manual_seed(SEED)
    single = Model(CFG).to(dev, torch.bfloat16)              # one GPU, the kernels
    torch.manual_seed(SEED)
    ep = expert_parallel(Model(CFG).to(dtype=torch.bfloat16), group)
    caches = [m.make_cache(len(seqs)) for m in (truth, single, ep)]
    errs = {"single": [], "ep": []}
    with torch.no_grad():
        for step in range(STEPS):
            ids, lens = _feed(seqs, step, prompts, decodes)
            if not any(lens):                      # nothing to run here: serve the other rank
                assert serve_step(ep) is True
                continue
            ids = ids.to(dev)
            valid = torch.arange(ids.shape[1])[None, :] < torch.tensor(lens)[:, None]
            t, s, e = (m(ids, cache=c, seq_lens=lens)[valid.to(dev)]
                       for m, c in zip((truth, single, ep), caches))
            errs["single"].append((s - t).abs().mean().item())
            errs["ep"].append((e - t).abs().mean().item())
        serve(ep)
    e_single = sum(errs["single"]) / len(errs["single"])
    e_ep = sum(errs["ep"]) / len(errs["ep"])
    assert e_ep <= 2 * e_single, (rank, e_ep, e_single)


@two_gpus
def test_model_on_two_gpus_as_accurate_as_one_gpu():
    run_ranks(2, _model_on_two_gpus, backend="nccl")


def _native_checkpoint(rank, world, path):
    from dsv4.distributed import from_pretrained
    group = ExpertParallelGroup.current()
    dev = group.device
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 512, (4, 11), generator=g).to(dev)[rank::world]
    truth = Model.from_pretrained(path, device=dev, dtype=torch.float32, progress=False)
    single = Model.from_pretrained(path, device=dev, dtype=torch.bfloat16, weights="native",
                                   progress=False)
    ep = from_pretrained(path, group, dtype=torch.bfloat16, weights="native", progress=False)
    assert ep.layers[3].ffn.stacked_weights().fmt == "fp4"
    with torch.no_grad():
        t, s, e = (m(ids) for m in (truth, single, ep))
    e_single, e_ep = (s - t).abs().mean().item(), (e - t).abs().mean().item()
    assert e_ep <= 2 * e_single, (rank, e_ep, e_single)


@two_gpus
def test_native_checkpoint_on_two_gpus(tmp_path):
    from dsv4.config import ModelConfig
    from dsv4.synthetic import make_checkpoint
    make_checkpoint(ModelConfig.tiny(vocab_size=512), str(tmp_path / "ckpt"), fmt="fp8",
                    n_shards=2, seed=3, tokenizer=False)
    run_ranks(2, _native_checkpoint, str(tmp_path / "ckpt"), backend="nccl")


@two_gpus
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="no torchrun on PATH")
def test_torchrun_generate_on_two_gpus():
    argv = ["generate", "--model", "tiny", "--prompt", "def fibonacci(n):", "--max-new-tokens",
            "8", "--device", "cuda", "--dtype", "float32"]
    single = run_dsv4_cli(argv)
    assert single.returncode == 0, single.stderr
    proc = run_dsv4_cli(argv, nproc=2)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == single.stdout
