"""The runtime's Python API: add requests, step, stream tokens (docs runtime.md).

    engine = dsv4.runtime.Engine(model, max_batch=8, max_model_len=4096)
    rid = engine.add_request(prompt_ids, SamplingParams(max_new_tokens=32))
    while engine.has_unfinished():
        for out in engine.step():
            print(out.request_id, out.new_token_ids, out.finished)

or ``engine.generate([ids_a, ids_b], params)`` for whole completions, or iterate
``engine.stream()``. The engine runs the same ``dsv4.Model`` modules and weights as the
reference forward (one definition of each layer), with a step batch on the device, caches
allocated once (:class:`~dsv4.runtime.pool.PagedCache`), continuous batching with chunked
prefill (:class:`~dsv4.runtime.scheduler.Scheduler`), CUDA-graph decode
(:class:`~dsv4.runtime.runner.ModelRunner`), sampling on the device and, on CUDA, an overlapped
loop (the host prepares step n + 1 while the GPU runs step n; :meth:`Engine.step`).
"""

from __future__ import annotations

import itertools
import math
import numbers
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import torch

from ..argtypes import int_sequence, iter_items
from ..cache import check_count
from ..ops.split_gemm import pending_copy_bytes
from .pool import PagedCache, blocks_needed, check_cache_formats
from .request import (Request, RequestOutput, SamplingParams, Status, TokenPrefix,
                      new_request_id)
from .runner import ModelRunner
from .scheduler import ScheduledRow, Scheduler

__all__ = ["Engine", "EngineStepError", "default_block_tokens"]

#: Why an expert-parallel engine runs decode eagerly (``runner.graph_off_reason``).
EP_GRAPHS_OFF = ("decode runs eagerly: the model is expert-parallel, and its MoE exchange reads "
                 "the all-to-all split sizes on the host, which a CUDA graph cannot capture")


#: Why an expert-parallel engine runs its steps one after the other (``overlap`` off).
EP_OVERLAP_OFF = ("an expert-parallel step with nothing to run serves the other ranks' "
                  "exchanges, so every rank's steps stay synchronous")


@dataclass
class _Launched:
    """A step whose device work is queued: what :meth:`Engine._complete` needs to finish it."""

    rows: list[ScheduledRow]
    counts: list[int]               # logit rows per scheduled row
    host: torch.Tensor              # int64 [2, S] ids and finiteness flags, pinned on CUDA
    event: Optional[torch.cuda.Event]    # recorded after the copy to ``host`` (CUDA only)
    logits: Optional[torch.Tensor]  # kept for step(logits=...), else None
    all_logits: bool

    def read(self) -> list[list[int]]:
        """[ids, finiteness flags] on the host, once the copy is done (waits for the step)."""
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


class EngineStepError(RuntimeError):
    """A step failed inside the model; the requests of that step were finished with
    ``finish_reason="error"`` (their slots and blocks freed). The engine stays usable."""

    def __init__(self, message: str, request_ids: list[str]):
        super().__init__(message)
        self.request_ids = request_ids


def default_block_tokens(config, target: int = 1024) -> int:
    """Tokens per pool block: the smallest multiple of every compress ratio >= ``target``."""
    ratios = [r for r in config.compress_ratios[:config.n_layers] if r]
    lcm = math.lcm(*ratios) if ratios else 1
    return lcm * max(1, -(-target // lcm))


class Engine:
    """Continuous-batching inference over a :class:`dsv4.Model` on its device.

    Args:
        model: the model (any dtype / device; the CUDA kernels run for bf16 on CUDA).
        max_batch: sequences in flight at once (cache slots); also the largest decode graph.
        max_model_len: longest sequence (prompt + generated tokens) a request may reach. It
            is not bounded by the model's ``max_position_embeddings``: positions past it take
            the same RoPE (YaRN) formula, as in the official code, which bounds positions only
            by its cache (``dsv4 bench --mode 1m`` decodes a few past 2**20); the generation
            helpers (``dsv4 generate``, :func:`dsv4.generate.generate`,
            :func:`dsv4.runtime.generate`) refuse them (:func:`dsv4.generate.check_positions`).
        block_tokens: tokens per pool block (default :func:`default_block_tokens`).
        num_blocks: blocks in the pool (default: every slot can reach ``max_model_len``).
        max_num_batched_tokens: tokens per step at most (prefill chunks + decode tokens).
        cuda_graphs: capture decode steps as CUDA graphs (default: on for CUDA).
        head_dtype: None for the official fp32 head, or torch.bfloat16 for the head weight
            in bf16 with fp32 accumulation (half the bytes per decode step). The engine does
            not change the model's weights: on a model whose head is fp32, bfloat16 makes (at
            the first step) a bf16 copy that the model caches beside it (2 bytes a value more:
            1.06 GB at V4-Flash width). After ``model.compact_head()`` the head is held once,
            in bf16: None computes the official fp32 head's logits from it, bfloat16 reads it
            as it is, and no copy is made; call it before building the engine to serve.
        overlap: the overlapped loop (default: on for CUDA): while the GPU runs step n the
            host schedules and packs step n + 1, which takes step n's sampled tokens on the
            device; the host reads them one step late (see :meth:`step`). Same tokens as the
            synchronous loop (``overlap=False``). Off for an expert-parallel model.
        indexer_cache: "bf16" (the model dtype) or "fp8" (the release's 132-byte FP8 indexer
            keys; exact with quant_sim, see :class:`~dsv4.runtime.pool.PagedCache`).
        kv_cache: "bf16" (the model dtype) or "fp8" (the release's 584-byte MODEL1 layout for
            the window rings and the compressed entries; head_dim 512, sm_90 on the kernel
            path; exact for a bf16 model with quant_sim, see
            :func:`~dsv4.runtime.pool.check_kv_cache`).

    Expert parallelism (a model made by ``dsv4.distributed.expert_parallel`` /
    ``from_pretrained``; :func:`dsv4.distributed.is_expert_parallel`): each rank builds its own
    engine over its own requests, and the engine keeps the ranks in step: CUDA graphs are off
    (``runner.graph_off_reason`` says why; an explicit ``cuda_graphs=True`` warns once), a
    :meth:`step` with nothing to run serves the other ranks' MoE exchanges for one step
    (``dsv4.distributed.serve_step``) instead of returning at once, and :meth:`generate`
    serves the others until every rank is done (``dsv4.distributed.serve``). A caller driving
    :meth:`step` itself calls it on every rank, the same number of times (an idle rank's step
    serves), and ``dsv4.distributed.serve(model)`` on every rank at the end.

    Raises ValueError for arguments outside their range, and (before allocating anything) when
    the cache would not fit in the device's available memory.
    """

    def __init__(self, model, max_batch: int = 16, max_model_len: int = 8192,
                 block_tokens: Optional[int] = None, num_blocks: Optional[int] = None,
                 max_num_batched_tokens: int = 8192, cuda_graphs: Optional[bool] = None,
                 head_dtype: Optional[torch.dtype] = None, indexer_cache: str = "bf16",
                 kv_cache: str = "bf16", overlap: Optional[bool] = None):
        from ..distributed.model import is_expert_parallel
        from ..model import Model
        if not isinstance(model, Model):
            raise TypeError(f"model must be a dsv4.Model, got {type(model).__name__}")
        self._ep = is_expert_parallel(model)   # its forward is a collective over the ranks
        c = model.config
        self.model = model
        self.config = c
        self.max_batch = check_count(max_batch, "max_batch")
        self.max_model_len = check_count(max_model_len, "max_model_len")
        bt = default_block_tokens(c) if block_tokens is None else check_count(
            block_tokens, "block_tokens")
        per_seq = blocks_needed(c, self.max_model_len, bt)
        nb = self.max_batch * per_seq if num_blocks is None else check_count(
            num_blocks, "num_blocks", 0)
        budget = check_count(max_num_batched_tokens, "max_num_batched_tokens")
        if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be None (on for CUDA), True or False, got "
                             f"{cuda_graphs!r}")
        if overlap is not None and not isinstance(overlap, bool):
            raise ValueError(f"overlap must be None (on for CUDA), True or False, got "
                             f"{overlap!r}")
        if head_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"head_dtype must be None, torch.float32 or torch.bfloat16, got "
                             f"{head_dtype!r}")
        check_cache_formats(c, indexer_cache, kv_cache, model.device)
        need = PagedCache.estimate_bytes(c, self.max_batch, nb, bt, model.dtype, indexer_cache,
                                         kv_cache)
        copies = _pending_copy_bytes(model, head_dtype)
        free = _available_bytes(model.device)
        if free is not None and need + copies > free:
            raise ValueError(
                f"the runtime cache ({self.max_batch} slots, {nb} blocks of {bt} tokens for "
                f"max_model_len {self.max_model_len}) needs {need / 2**30:.2f} GiB"
                + (f" (+ {copies / 2**30:.2f} GiB of bf16 weight copies made at the first "
                   "step)" if copies else "")
                + f" but {model.device} has {free / 2**30:.2f} GiB available; lower "
                "max_batch, max_model_len or num_blocks"
                + ("; DSV4_FP32_LINEAR=fp32 / model.compact_head() avoid the weight copies"
                   if copies else ""))
        self.cache = PagedCache(c, self.max_batch, nb, bt, model.dtype, model.device,
                                indexer_cache, kv_cache)
        self.scheduler = Scheduler(self.cache, budget)
        graphs = model.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        if self._ep:        # capture would also run the model on this rank alone (a deadlock)
            if cuda_graphs:
                warnings.warn(f"dsv4.runtime: cuda_graphs=True ignored: {EP_GRAPHS_OFF}",
                              RuntimeWarning, stacklevel=2)
            graphs = False
        self.runner = ModelRunner(model, self.cache, self.max_model_len, head_dtype, graphs,
                                  self.max_batch)
        if self._ep:
            self.runner.graph_off_reason = EP_GRAPHS_OFF
            if overlap:
                warnings.warn(f"dsv4.runtime: overlap=True ignored: {EP_OVERLAP_OFF}",
                              RuntimeWarning, stacklevel=2)
        #: the overlapped loop is on (see :meth:`step`)
        self.overlap = (model.device.type == "cuda" if overlap is None else overlap) and \
            not self._ep
        self.requests: dict[str, Request] = {}
        self._inflight: Optional[_Launched] = None   # the launched step not yet read
        self._ready: list[RequestOutput] = []         # outputs held over by a failed step
        #: seconds step() spent waiting for the GPU (for a step's sampled tokens): a step's
        #: wall time minus this is its host time (benchmarks)
        self.wait_seconds = 0.0

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt_ids: Sequence[int] | torch.Tensor,
                    params: Optional[SamplingParams] = None,
                    request_id: Optional[str] = None) -> str:
        """Queue a request; it joins the running batch at the next step that has room.

        Args:
            prompt_ids: token ids (a list or 1-D integer tensor), at least one.
            params: :class:`SamplingParams` (default: greedy, 64 new tokens).
            request_id: a non-empty str, not in use (default: a generated name that no
                request of this engine holds).

        Returns the request id.

        Raises:
            ValueError: an empty prompt, ids outside [0, vocab_size) (prompt ids, and the
                ``eos_token_id`` / ``stop_token_ids`` of ``params``: the model never samples
                them, the stop would be silently off), a request_id that is not a non-empty
                str or is in use, or a
                request that can never fit: prompt + max_new_tokens beyond ``max_model_len``,
                or more blocks than the whole pool holds. Nothing is queued then, and the
                running requests are not disturbed.
        """
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        vocab = self.config.vocab_size
        ids = _token_list(prompt_ids, vocab)
        if params.eos_token_id is not None and params.eos_token_id >= vocab:
            raise ValueError(f"params.eos_token_id must be -1 (never), None (the config's) or a "
                             f"token id in [0, {vocab}), got {params.eos_token_id}")
        bad = next((t for t in params.stop_token_ids if t >= vocab), None)
        if bad is not None:
            raise ValueError(f"params.stop_token_ids must be token ids in [0, {vocab}), got "
                             f"{bad}")
        total = len(ids) + params.max_new_tokens
        if total > self.max_model_len:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens "
                             f"({params.max_new_tokens}) = {total} exceeds max_model_len "
                             f"{self.max_model_len}")
        need = self.cache.blocks_for(total)
        if need > self.cache.num_blocks:
            raise ValueError(f"the request needs {need} blocks of {self.cache.block_tokens} "
                             f"tokens ({total} tokens) but the pool holds "
                             f"{self.cache.num_blocks}; raise num_blocks or shorten it")
        if request_id is not None and (not isinstance(request_id, str) or not request_id):
            raise ValueError(f"request_id must be a non-empty str or None (a generated name), "
                             f"got {request_id!r}")
        if request_id is not None and request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        eos = params.eos_token_id if params.eos_token_id is not None else getattr(
            self.config, "eos_token_id", None)
        gen = None
        if not params.greedy:
            gen = torch.Generator(device=self.model.device)
            if params.seed is None:
                gen.seed()
            else:
                gen.manual_seed(params.seed)
        req = Request(prompt_ids=ids, params=params,
                      eos_token_id=None if eos is None or eos < 0 else eos, generator=gen)
        if request_id is not None:
            req.request_id = request_id
        while req.request_id in self.requests:      # a generated name a caller already took
            req.request_id = new_request_id()
        self.requests[req.request_id] = req
        self.scheduler.add(req)
        return req.request_id

    def abort(self, request_id: str) -> None:
        """Stop a request now (between steps); its slot and blocks are freed (a step in flight
        that feeds it runs before any later step that reuses them, and its token is
        discarded). Raises KeyError for an unknown (or already finished) request."""
        req = self.requests.get(request_id)
        if req is None:
            raise KeyError(f"unknown request_id {request_id!r}")
        if req.status != Status.FINISHED:
            self.scheduler.finish(req, "abort")
        del self.requests[request_id]

    def has_unfinished(self) -> bool:
        """Requests queued or running, or a step in flight whose outputs are not returned."""
        return self.scheduler.has_work or self._inflight is not None or bool(self._ready)

    # ------------------------------------------------------------------ stepping
    def step(self, logits: Optional[str] = None) -> list[RequestOutput]:
        """Run one step: schedule, run the model, sample, retire finished requests.

        Overlapped loop (``overlap``, the default on CUDA): the step is launched on the GPU
        and the call returns the outputs of the step before it, which the GPU ran while this
        one was being scheduled and packed; its tokens come back through a non-blocking copy,
        and the step launched here feeds them to the model on the device. A request that
        stopped at step n (EOS or a stop token, which the host learns one step late) was fed
        once more in step n + 1; that token is discarded (its slot and blocks, freed when the
        host reads step n, are used again only by steps queued after step n + 1 on the same
        stream). The outputs are those of the synchronous loop, one call later; a call that
        has nothing new to run returns the last step's outputs. ``logits="sampled"`` or
        ``"all"`` runs synchronously: the step in flight is completed first and its outputs
        (without logits) come first in the list.

        Args:
            logits: None (default): only the positions that are sampled get logits, and they
                are not returned. ``"sampled"``: ``RequestOutput.logits`` holds them (float32
                [1, vocab] on the device; the step runs as usual, a CUDA graph for decode).
                ``"all"``: every token fed in this step gets logits, returned per request
                (the step runs eagerly; requests in the middle of a prompt get outputs too).
                Each position's logits are returned once, in order: the positions a preempted
                request feeds again while it is recomputed are not returned a second time.

        Returns one :class:`RequestOutput` per request that sampled a token or finished (with
        ``logits="all"``: per request fed), for the step(s) completed in this call. On an
        expert-parallel model a step with nothing to run serves the other ranks' exchanges
        of their step (``dsv4.distributed.serve_step``).

        Raises:
            RuntimeError: the model was moved to another dtype or device after the engine
                was built (nothing is scheduled or changed).
            EngineStepError: the model raised; the step's requests are finished with
                ``finish_reason="error"`` and everything else continues (with the overlapped
                loop, the outputs of the step before it come with the next call). A
                KeyboardInterrupt is re-raised after the same clean-up.
        """
        if logits not in (None, "sampled", "all"):
            raise ValueError(f"logits must be None, 'sampled' or 'all', got {logits!r}")
        m = self.model
        if m.dtype != self.cache.dtype or m.device != self.cache.device:
            raise RuntimeError(f"the model is {m.dtype} on {m.device} but this Engine's cache "
                               f"holds {self.cache.dtype} on {self.cache.device}: the model was "
                               "moved after the Engine was built; move it back or build a new "
                               "Engine (nothing was run)")
        overlap = self.overlap and logits is None
        outputs, self._ready = self._ready, []
        try:
            return self._step(logits, overlap, outputs)
        except BaseException:
            # what this call gathered before it failed (outputs held over by an earlier
            # failed call, a completed step's) comes with the next call: never dropped
            self._ready = outputs
            raise

    def _step(self, logits: Optional[str], overlap: bool,
              outputs: list[RequestOutput]) -> list[RequestOutput]:
        """The body of :meth:`step`; appends to ``outputs`` (in place) as steps complete."""
        if self._inflight is not None and self._inflight.event is not None:
            # a call on another CUDA stream than the step in flight: this stream's work (slot
            # resets in schedule(), the next step reading the in-flight step's sampled ids)
            # runs after that step (a GPU-side wait: no host sync; same stream: a no-op)
            torch.cuda.current_stream(self.runner.device).wait_event(self._inflight.event)
        if not overlap and self._inflight is not None:
            outputs += self._complete(self._take_inflight())
        rows = self.scheduler.schedule()
        if not rows:
            if self._inflight is not None:
                outputs += self._complete(self._take_inflight())
            elif self._ep:  # the other ranks' MoE layers exchange with this rank in their step
                from ..distributed.model import serve_step
                serve_step(self.model)
            return outputs
        prev = self._take_inflight()            # None unless overlapped
        try:
            launched = self._launch(rows, logits, prev)
        except BaseException as e:
            ids = self._fail([r.request for r in rows], e)
            if prev is not None:                # its outputs come with the next call
                try:
                    outputs += self._complete(prev)
                except EngineStepError:
                    pass
            if isinstance(e, Exception):
                raise EngineStepError(f"step failed for requests {ids}: {e}", ids) from e
            raise
        if overlap:
            self._inflight = launched
            if prev is not None:
                outputs += self._complete(prev)
            return outputs
        outputs += self._complete(launched)
        return outputs

    def _fail(self, reqs: list[Request], e: BaseException) -> list[str]:
        """Finish ``reqs`` with ``finish_reason="error"`` (``e`` as the reason; slots and blocks
        freed) and forget them; returns their ids."""
        for req in reqs:
            self.scheduler.finish(req, "error", f"{type(e).__name__}: {e}"[:500])
            self.requests.pop(req.request_id, None)
        return [req.request_id for req in reqs]

    def _discard_inflight(self) -> None:
        """Wait for the step in flight (its requests were aborted) and drop its outputs."""
        st = self._take_inflight()
        self._ready = []
        if st is not None:
            try:
                self._complete(st)
            except EngineStepError:
                pass

    def _take_inflight(self) -> Optional["_Launched"]:
        st, self._inflight = self._inflight, None
        return st

    def _launch(self, rows, logits: Optional[str], prev: Optional["_Launched"]) -> "_Launched":
        """The device work of a step (:meth:`ModelRunner.run`): the model on ``rows`` (their
        tokens pending in ``prev`` taken on the device), the sampling of the rows that
        sample, then the non-blocking copy of the sampled ids and finiteness flags to the
        host. The rows' tokens count as computed from here on, and a sampled token as pending
        until :meth:`_complete` reads it. No host synchronisation in a decode step."""
        ran = self.runner.run(rows, logits == "all", prev is not None)
        j = 0
        for r in rows:
            req = r.request
            req.num_computed += r.n
            if r.sample:
                req.num_pending += 1
                req.pending_index = j
                j += 1
        return _Launched(rows, ran.counts, ran.host, ran.event,
                         ran.logits if logits is not None else None, logits == "all")

    def _complete(self, st: "_Launched") -> list[RequestOutput]:
        """Read the sampled tokens of a launched step (waiting for its copy) and apply them:
        stop conditions, outputs, retirement. A token of a request that already finished (at
        an earlier token, or aborted) is discarded. Raises EngineStepError (the step's
        requests finished with an error) when the device reports one here."""
        try:
            t = time.perf_counter()
            toks, finite = st.read()
            self.wait_seconds += time.perf_counter() - t
        except BaseException as e:
            ids = self._fail([r.request for r in st.rows if r.request.status != Status.FINISHED],
                             e)
            if isinstance(e, Exception):
                raise EngineStepError(f"step failed for requests {ids}: {e}", ids) from e
            raise
        outputs = []
        it = iter(zip(toks, finite))
        for r, end, cnt in zip(st.rows, itertools.accumulate(st.counts), st.counts):
            out = None
            req = r.request
            skip = 0
            if st.all_logits:   # positions a preemption made us feed again were returned already
                skip = min(cnt, max(0, req.logits_returned - r.start))
                req.logits_returned = max(req.logits_returned, r.start + r.n)
            if r.sample:
                tok, ok = next(it)
                req.num_pending -= 1
                if not req.num_pending:
                    req.pending_index = None
                if req.status != Status.FINISHED:
                    out = self._advance(req, tok, bool(ok))
            elif st.all_logits and skip < cnt:
                out = RequestOutput(req.request_id, [], _tokens_so_far(req), False)
            if out is not None:
                if st.logits is not None:
                    out.logits = st.logits[end - cnt + skip:end].clone()
                outputs.append(out)
        return outputs

    def _advance(self, req: Request, tok: int, finite: bool) -> RequestOutput:
        new: list[int] = []
        if not finite:
            self.scheduler.finish(req, "error", "the model produced non-finite logits")
        elif req.eos_token_id is not None and tok == req.eos_token_id:
            self.scheduler.finish(req, "eos")
        else:
            req.output_ids.append(tok)
            new = [tok]
            if tok in req.params.stop_token_ids:
                self.scheduler.finish(req, "stop")
            elif len(req.output_ids) >= req.params.max_new_tokens:
                self.scheduler.finish(req, "length")
        done = req.status == Status.FINISHED
        if done:
            self.requests.pop(req.request_id, None)
        return RequestOutput(req.request_id, new, _tokens_so_far(req), done, req.finish_reason,
                             req.error)

    def stream(self) -> Iterator[RequestOutput]:
        """Step until every request has finished, yielding each step's outputs."""
        while self.has_unfinished():
            yield from self.step()

    def generate(self, prompts: Iterable[Sequence[int]],
                 params: Optional[SamplingParams | Sequence[SamplingParams]] = None
                 ) -> list[list[int]]:
        """Complete every prompt (continuously batched); returns the generated ids of each,
        in order (EOS excluded).

        On an expert-parallel model every rank calls it (each with its own prompts, none
        included); a rank that is done serves the others until every rank is done
        (``dsv4.distributed.then_serve``), also when it raises.

        Args:
            prompts: a sequence of prompts, each what :meth:`add_request` accepts (or a 2-D
                integer tensor, one prompt per row).
            params: one :class:`SamplingParams` for all, or one per prompt.

        Raises:
            ValueError: the engine already holds requests (their outputs would be consumed
                here; drive them with :meth:`step` / :meth:`stream` or :meth:`abort` them),
                ``prompts`` is not an ordered sequence of prompts (a set or dict, a flat
                sequence of ints, a scalar), or a prompt / params is invalid
                (:meth:`add_request`'s errors). Nothing is queued then.
            EngineStepError: a step failed; RuntimeError: a request ended with an error.
            On any exception (Ctrl-C included) the requests of this call that are still
            queued or running are aborted: the engine is left idle, as it was.
        """
        if self._ep:
            from ..distributed.model import then_serve
            return then_serve(self.model, self._generate, prompts, params)
        return self._generate(prompts, params)

    def _generate(self, prompts, params) -> list[list[int]]:
        if self.requests or self.has_unfinished():
            raise ValueError(f"generate() needs an idle engine: {len(self.requests)} request(s) "
                             "already added would be run and their outputs dropped; drive them "
                             "with step() / stream() or abort() them first")
        what = ("prompts must be a sequence of prompts (each a list or 1-D tensor of token ids; "
                "or a 2-D tensor or array, one prompt per row)")
        if isinstance(prompts, (set, frozenset, Mapping)):
            raise ValueError(f"{what}, got a {type(prompts).__name__} (unordered: the results "
                             "come in the order of the prompts; pass a list)")
        items = None if isinstance(prompts, torch.Tensor) and prompts.dim() != 2 else \
            iter_items(prompts)
        if items is None:
            raise ValueError(f"{what}, got {type(prompts).__name__} "
                             f"{tuple(getattr(prompts, 'shape', ()))}")
        prompts = list(items)
        if any(isinstance(p, numbers.Integral) or (isinstance(p, torch.Tensor) and p.dim() == 0)
               for p in prompts):
            raise ValueError(f"{what}, got a flat sequence of ints; wrap it: [ids]")
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} SamplingParams")
        ids: list[str] = []
        try:
            for p, sp in zip(prompts, plist):
                ids.append(self.add_request(p, sp))
            final: dict[str, RequestOutput] = {}
            while self.has_unfinished():
                for out in self.step():
                    if out.finished:
                        final[out.request_id] = out
        finally:
            for rid in ids:
                if rid in self.requests:
                    self.abort(rid)
            self._discard_inflight()
        res = []
        for rid in ids:
            out = final[rid]
            if out.finish_reason == "error":
                raise RuntimeError(f"request {rid} failed: {out.error}")
            res.append(out.token_ids)
        return res


def _tokens_so_far(req: Request) -> TokenPrefix:
    """The request's output tokens as they are now, without copying them (O(1) per step)."""
    return TokenPrefix(req.output_ids, len(req.output_ids))


def _available_bytes(device: torch.device) -> Optional[int]:
    """Memory ``device`` can still give: free CUDA memory plus the blocks torch's caching
    allocator reserved but does not use (an earlier engine's pool), or the host's MemAvailable
    for the CPU (Linux); None when unknown (then nothing is checked)."""
    try:
        if device.type == "cuda":       # + what torch's caching allocator holds unused
            return int(torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
                       - torch.cuda.memory_allocated(device))
        if device.type == "cpu":
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError):
        pass
    return None


def _pending_copy_bytes(model, head_dtype: Optional[torch.dtype]) -> int:
    """Bytes of the bf16 weight copies the first step of a bf16 model may still make: the
    compressors' (:func:`dsv4.ops.split_gemm.pending_copy_bytes`) and, for
    ``head_dtype=torch.bfloat16`` with an fp32 head, the head's (``Model._low_precision_head``:
    V4-Flash 1.06 GB)."""
    if model.dtype != torch.bfloat16:       # fp32 activations: no bf16 path, no copy
        return 0
    n = pending_copy_bytes(_bf16_path_weights(model))
    w = model._head_param()
    if (head_dtype == torch.bfloat16 and w is not None and w.dtype != torch.bfloat16
            and model._cached_head_copy(torch.bfloat16) is None):
        n += 2 * w.numel()
    return n


def _bf16_path_weights(model) -> list[torch.Tensor]:
    """The fp32 weights a step may multiply through a bf16 copy (dsv4.ops.split_gemm): those
    of the fp32-pinned linears (the compressors' ``wkv`` / ``wgate``) other than the head,
    which has its own path."""
    from ..layers.linear import Linear
    return [m._parameters["weight"] for m in model.modules()
            if type(m) is Linear and m.keep_fp32 and m is not model.head
            and m._parameters.get("weight") is not None]


def _token_list(prompt_ids, vocab: int) -> list[int]:
    """Validate a prompt (list / tuple / 1-D integer tensor of ids in [0, vocab))."""
    what = f"prompt_ids must be a non-empty sequence of token ids in [0, {vocab})"
    ids = int_sequence(prompt_ids, what)
    if not ids:
        raise ValueError(f"{what}; got an empty prompt")
    bad = next((v for v in ids if not 0 <= v < vocab), None)
    if bad is not None:
        raise ValueError(f"{what}; got {bad}")
    return ids
