"""``dsv4 generate`` on the runtime: one prompt through :class:`~dsv4.runtime.Engine`.

Same arguments, streaming contract and result as the reference loop
:func:`dsv4.generate.generate` (which stays the oracle and the CPU path): the prompt is
prefilled in chunks with logits for its last position only, each decode step replays a CUDA
graph on a GPU, and the token is drawn on the device by the same sampler
(:func:`dsv4.generate.sample` with the request's seeded generator), so a greedy or seeded run
gives the tokens of the reference loop up to the kernels' rounding.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..generate import (GenerationResult, _final_text, _StopStringFilter, check_eos_id,
                        check_generate_args, check_positions)
from .engine import Engine
from .request import SamplingParams

__all__ = ["generate", "compact_head_if_exact", "fuse_projections_for_serving"]


def generate(model, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             eos_id: int | None = 1, stop_strings: Sequence[str] = (),
             on_token: Callable[[int, str], Any] | None = None, tokenizer: Any | None = None,
             **engine_args) -> GenerationResult:
    """Generate a continuation of one prompt on the runtime engine.

    Arguments, callbacks, errors and the returned :class:`~dsv4.generate.GenerationResult`
    are those of :func:`dsv4.generate.generate`; ``engine_args`` go to
    :class:`~dsv4.runtime.Engine` (default: one slot, ``max_model_len`` = prompt +
    ``max_new_tokens``). ``prefill_seconds`` is the time to the first token.

    Expert parallelism (``dsv4.distributed``): every rank calls it, each with its own prompt
    (``max_new_tokens=0`` on a rank with nothing to generate, as ``torchrun ... dsv4 generate``
    does on ranks other than 0); a rank that is done serves the others' MoE exchanges until
    every rank is done, also when it stops early (EOS, a stop string) or raises.
    """
    from ..distributed.model import is_expert_parallel, then_serve
    args = (model, prompt_ids, max_new_tokens, temperature, top_p, top_k, seed, eos_id,
            stop_strings, on_token, tokenizer)
    if is_expert_parallel(model):
        return then_serve(model, _generate, *args, **engine_args)
    return _generate(*args, **engine_args)


def compact_head_if_exact(model) -> bool:
    """For a caller that built ``model`` to serve it (``dsv4 generate`` on a GPU): hold its
    head once, in bf16 (:meth:`dsv4.Model.compact_head`: the same fp32 logits, half the head's
    memory and decode bytes) when every value of the head is a bf16 value, as a checkpoint's
    always is; leave an fp32 head with other values (``--model tiny``'s random head) as it is.
    Returns whether the head is compact now. :func:`generate` and the Engine never call it:
    they leave a model passed to them as it is."""
    compact = getattr(model, "compact_head", None)
    if compact is None:
        return False
    try:
        compact()
    except ValueError:
        return False
    return True


def fuse_projections_for_serving(model) -> bool:
    """For a caller that built ``model`` to serve it (``dsv4 generate`` on a GPU, beside
    :func:`compact_head_if_exact`): run each layer's same-input projections as one GEMM
    (:meth:`dsv4.Model.fuse_projections`: the same weights and maths, fewer GEMM launches a
    step). Returns whether any group is fused (a model without the method, or whose linears
    are all natively stored, has none). :func:`generate` and the Engine never call it."""
    fuse = getattr(model, "fuse_projections", None)
    if fuse is None:
        return False
    fuse()
    return bool(model.fused_projection_groups())


def _generate(model, prompt_ids, max_new_tokens, temperature, top_p, top_k, seed, eos_id,
              stop_strings, on_token, tokenizer, **engine_args) -> GenerationResult:
    prompt, stop_strings = check_generate_args(prompt_ids, max_new_tokens, temperature, top_p,
                                               top_k, stop_strings, tokenizer, seed)
    eos_id = check_eos_id(eos_id)
    max_new_tokens = operator.index(max_new_tokens)
    check_positions(model.config, len(prompt), max_new_tokens)
    from ..tokenizer import StreamDecoder

    decoder = StreamDecoder(tokenizer) if tokenizer is not None else None
    stops = _StopStringFilter(stop_strings)
    token_ids: list[int] = []
    finish = "length"
    new_tokens = 0
    prefill_seconds = 0.0
    dev = model.device
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    if max_new_tokens > 0:
        args = dict(max_batch=1, max_model_len=len(prompt) + max_new_tokens)
        args.update(engine_args)
        engine = Engine(model, **args)
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                top_p=top_p, top_k=top_k, seed=seed,
                                eos_token_id=(eos_id if eos_id is not None
                                              and 0 <= eos_id < model.config.vocab_size
                                              else -1))   # as generate(): never sampled
        rid = engine.add_request(prompt, params)
        t0 = time.perf_counter()   # the engine's allocation is set-up, not generation
        try:
            for out in engine.stream():
                if out.finish_reason == "error":   # non-finite logits: sample()'s ValueError
                    raise ValueError(f"generation failed: {out.error}, no token can be sampled")
                new_tokens += 1
                if new_tokens == 1:
                    prefill_seconds = time.perf_counter() - t0
                if out.finish_reason == "eos":
                    finish = "eos"
                    break
                token = out.new_token_ids[0]
                token_ids.append(token)
                piece = stops.push(decoder.step(token)) if decoder is not None else ""
                if on_token is not None:
                    on_token(token, piece)
                if stops.stop_at is not None:
                    finish = "stop"
                    break
        finally:
            if rid in engine.requests:
                engine.abort(rid)
    sync()
    seconds = time.perf_counter() - t0
    text = _final_text(decoder, stops, finish, on_token)
    return GenerationResult(token_ids=token_ids, text=text, prompt_tokens=len(prompt),
                            new_tokens=new_tokens, seconds=seconds,
                            tokens_per_second=new_tokens / seconds if seconds > 0 else 0.0,
                            finish_reason=finish, prefill_seconds=prefill_seconds)
