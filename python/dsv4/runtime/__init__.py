"""dsv4's GPU execution engine (issue 8; docs runtime.md): the same ``dsv4.Model`` modules and
weights as the reference forward, run with a step batch on the device, caches allocated once
(window rings per slot, compressed entries in a paged pool), continuous batching with chunked
prefill, CUDA-graph decode and sampling on the device.

    from dsv4.runtime import Engine, SamplingParams
    engine = Engine(model, max_batch=8, max_model_len=4096)
    outputs = engine.generate([prompt_a, prompt_b], SamplingParams(max_new_tokens=32))
"""

from .engine import Engine, EngineStepError
from .generate import generate
from .pool import BlockAllocator, PagedCache, PoolExhausted
from .request import RequestOutput, SamplingParams

__all__ = ["Engine", "EngineStepError", "SamplingParams", "RequestOutput", "PagedCache",
           "BlockAllocator", "PoolExhausted", "generate"]
