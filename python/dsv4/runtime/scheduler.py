"""Continuous batching: which tokens of which requests the next step feeds (docs runtime.md §5).

Every step, under a token budget:

1. each running request that is decoding gets its one token (the last sampled one), oldest
   first; if its sequence needs a new block and the pool has none, the most recently admitted
   request not yet in the step is preempted (possibly itself: its slot and blocks are freed
   and it is queued again, to be recomputed from its prompt and generated tokens; outputs are
   unchanged);
2. running requests in the middle of their prompt get their next chunk (shrunk to the free
   blocks when the pool is short, else preempting as above);
3. waiting requests are admitted in arrival order while a slot, blocks and budget remain, with
   a first chunk of their prompt (not in a step that had to preempt).

A row needs logits iff the step feeds the last known token of its request (the end of the
prompt, or a decode token): only those rows are sampled. Finished requests free their slot and
blocks before the next step.

Overlapped loop (``Engine(overlap=True)``): the next step is scheduled while the step before it
runs, before the host has read its sampled tokens. Those tokens count as known
(``Request.num_pending``): a request that sampled gets its decode row (fed on the device); a
request whose ``max_new_tokens``-th token is pending gets none and gives its slot and blocks
back at once (as the synchronous loop would before this step; only steps queued after the one
in flight can reuse them), it finishes when the host reads that token; a request that stopped
on a token the host has not read yet (EOS, a stop token) gets one row too many, whose token the
engine discards, and frees its slot one step later than the synchronous loop. A preempted
request whose last token is still pending is admitted again only once it has been read.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .pool import PagedCache
from .request import Request, Status

__all__ = ["Scheduler", "ScheduledRow"]


@dataclass
class ScheduledRow:
    """One row of a step: feed ``request.token_ids[start:start + n]``; ``sample`` = the row's
    last token gets logits and a new token is sampled from them."""

    request: Request
    start: int
    n: int
    sample: bool


class Scheduler:
    """Admission, chunking and preemption over a :class:`PagedCache` (host side only).

    Args:
        cache: the slots and block pool.
        max_num_batched_tokens: tokens per step at most (prefill chunks + decode tokens).
    """

    def __init__(self, cache: PagedCache, max_num_batched_tokens: int):
        self.cache = cache
        self.budget = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _release(self, req: Request) -> None:
        if req.slot is not None:
            self.cache.release_slot(req.slot)
            req.slot = None
        if req.block_table:
            self.cache.blocks.free(req.block_table)
            req.block_table = []

    def finish(self, req: Request, reason: str, error: str | None = None) -> None:
        """Retire ``req`` (running or waiting): free its slot and blocks."""
        self._release(req)
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.error = error

    def _preempt(self, req: Request) -> None:
        self._release(req)
        self.running.remove(req)
        req.status = Status.WAITING
        req.num_computed = 0
        self.waiting.appendleft(req)

    def schedule(self) -> list[ScheduledRow]:
        """The rows of the next step (empty when there is nothing to run)."""
        for req in [r for r in self.running if r.last_token_pending]:
            self._release(req)      # nothing more to feed (overlapped loop, see above)
            self.running.remove(req)
        rows: list[ScheduledRow] = []
        budget = self.budget
        scheduled: set[int] = set()
        preempted = False
        # 1. decode tokens, then 2. prompt chunks of running requests, oldest first.
        order = sorted(self.running, key=lambda r: (r.remaining > 1, r.arrival))
        for req in order:
            if budget == 0:
                break
            if req.status != Status.RUNNING or id(req) in scheduled:
                continue
            n = min(req.remaining, budget)
            if n > 1:   # a prompt chunk shrinks to the blocks it can get before anyone is evicted
                cap = ((len(req.block_table) + self.cache.blocks.num_free)
                       * self.cache.block_tokens - req.num_computed)
                if 0 < cap < n:
                    n = cap
            while self.cache.grow(req.block_table, req.num_computed + n) is None:
                # The pool is short: preempt the youngest request not yet in this step
                # (possibly this one).
                victims = [r for r in self.running if id(r) not in scheduled]
                victim = max(victims, key=lambda r: r.arrival)
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            if req.status != Status.RUNNING:
                continue
            rows.append(ScheduledRow(req, req.num_computed, n, n == req.remaining))
            scheduled.add(id(req))
            budget -= n
        # 3. admissions (none in a step that had to preempt: the pool is short).
        while not preempted and self.waiting and budget > 0 and self.cache.num_free_slots:
            req = self.waiting[0]
            if req.num_pending:     # preempted with its last token unread: not fed before read
                break
            n = min(req.remaining, budget)
            table: list[int] = []
            if self.cache.grow(table, n) is None:
                free = self.cache.blocks.num_free
                n = min(n, free * self.cache.block_tokens)
                if n <= 0 or self.cache.grow(table, n) is None:
                    break
            self.waiting.popleft()
            req.slot = self.cache.take_slot()
            req.block_table = table
            req.status = Status.RUNNING
            self.running.append(req)
            rows.append(ScheduledRow(req, req.num_computed, n, n == req.remaining))
            scheduled.add(id(req))
            budget -= n
        return rows

    def admit_prefilled(self, req: Request, n_computed: int) -> None:
        """Benchmarks only: admit ``req`` now as if its first ``n_computed`` tokens were
        already in the cache (their cache contents are whatever the slot and blocks hold), so
        that decode at a long context can be timed without prefilling it. Raises RuntimeError
        without a free slot or blocks (nothing changed)."""
        if req not in self.waiting or not 0 <= n_computed < req.num_tokens:
            raise ValueError("admit_prefilled: a waiting request and 0 <= n_computed < its "
                             "tokens are required")
        if not self.cache.num_free_slots:
            raise RuntimeError("admit_prefilled: no free slot")
        table: list[int] = []
        if self.cache.grow(table, n_computed + 1) is None:
            raise RuntimeError(f"admit_prefilled: the pool cannot hold {n_computed + 1} tokens")
        self.waiting.remove(req)
        req.slot = self.cache.take_slot()
        req.block_table = table
        req.num_computed = n_computed
        req.status = Status.RUNNING
        self.running.append(req)
