"""Model.fuse_projections in the runtime engine on the GPU (runs on the H200): the fused
model's logits (chunked prefill, then decode replayed from CUDA graphs) pass the kernel
tolerance rule, every group runs as one GEMM inside the captured graphs, replay equals eager,
and a fused decode step stays free of host synchronisation."""

from __future__ import annotations

import pytest

from _runtime_common import random_prompts
from test_engine_cuda import (_assert_as_accurate_as_the_bf16_reference,
                              _assert_graph_step_equals_eager, _collect, _graph_engine, _models,
                              _sync_free_decode_steps, _to_decode)

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("quant_sim", [False, True])
def test_fused_engine_as_accurate_as_the_bf16_reference(served, quant_sim):
    """3 prompts with joins (2 slots), chunked prefill, graph-replayed decode on the fused
    bf16 model: logits within the tolerance rule against the fp32 model, the bf16 reference
    being the UNFUSED model on the reference backend; every group served every call."""
    from dsv4.runtime import Engine
    m32, m16 = _models(quant_sim)
    _, f16 = _models(quant_sim)
    f16.fuse_projections()
    assert len(f16.fused_projection_groups()) == 13
    engine = Engine(f16, max_batch=2, max_model_len=320, max_num_batched_tokens=96)
    runs = _collect(engine, random_prompts([200, 77, 5]), 24)
    assert engine.runner.stats["graph_steps"] > 0, engine.runner.graph_off_reason
    assert served and all(served)
    _assert_as_accurate_as_the_bf16_reference(runs, m32, m16)


def test_fused_graph_replay_equals_eager():
    """The first decode step of the fused model from a CUDA graph and eagerly: the same
    logits up to bf16 rounding (the rule of test_engine_cuda.test_graph_replay_equals_eager)."""
    _, f16 = _models()
    f16.fuse_projections()
    _assert_graph_step_equals_eager(f16, random_prompts([33, 70, 5], seed=4))


def test_fused_decode_step_is_sync_free():
    """The group checks are host work only: whole decode steps of the fused model under
    set_sync_debug_mode("error"), replayed from graphs."""
    _, f16 = _models()
    f16.fuse_projections()
    engine = _graph_engine(f16, overlap=False)
    _to_decode(engine, random_prompts([33, 70, 5]))
    engine.step()
    engine.step()
    _sync_free_decode_steps(engine, 3)
    assert engine.runner.graph_off_reason is None, engine.runner.graph_off_reason

