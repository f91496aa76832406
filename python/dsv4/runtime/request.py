"""Requests of the runtime: sampling parameters, lifecycle state, per-step outputs."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch

from ..argtypes import check_seed, iter_items
from ..cache import check_count
from ..generate import SEED_LIMIT, check_sampling_args

__all__ = ["SamplingParams", "Request", "RequestOutput", "Status"]

_ids = itertools.count()


def new_request_id() -> str:
    """A generated request name, ``req-N`` (N unique in this process)."""
    return f"req-{next(_ids)}"


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops.

    Attributes:
        max_new_tokens: tokens to generate at most (>= 1).
        temperature, top_p, top_k: :func:`dsv4.generate.sample`'s (0 = greedy; the official
            Gumbel-max sampler otherwise, architecture.md §13.1).
        seed: seeds the request's own ``torch.Generator`` (an int in [0, 2**64); None:
            nondeterministic; on the CPU only its low 32 bits count, see
            :func:`dsv4.generate.generate`); a request's sampled tokens do not depend on the
            other requests of the batch.
        eos_token_id: stop when sampled (not returned); None: the model config's; -1: never;
            else a token id >= 0.
        stop_token_ids: more ids that stop generation (returned, as the stop token); a
            sequence of ints >= 0.

    Raises ValueError naming the field for a value outside these ranges. Token ids past the
    vocabulary (which would never be sampled: the stop silently off) are refused by
    :meth:`dsv4.runtime.Engine.add_request`, which knows the model's ``vocab_size``.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    eos_token_id: Optional[int] = None
    stop_token_ids: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "max_new_tokens",       # numpy / 0-d tensor ints → int
                           check_count(self.max_new_tokens, "max_new_tokens"))
        for name, value in zip(("temperature", "top_p", "top_k"),       # numpy scalars → python
                               check_sampling_args(self.temperature, self.top_p, self.top_k)):
            object.__setattr__(self, name, value)
        if self.seed is not None:
            object.__setattr__(self, "seed", check_seed(self.seed, SEED_LIMIT))
        if self.eos_token_id is not None:
            try:
                eos = check_count(self.eos_token_id, "eos_token_id", -1)
            except ValueError:
                raise ValueError(f"eos_token_id must be None (the model config's), -1 (never) "
                                 f"or a token id >= 0, got {self.eos_token_id!r}") from None
            object.__setattr__(self, "eos_token_id", eos)
        stops = self.stop_token_ids
        items = iter_items(stops)
        if items is None:
            raise ValueError(f"stop_token_ids must be a sequence of token ids (ints >= 0), got "
                             f"{stops!r}")
        object.__setattr__(self, "stop_token_ids",
                           tuple(check_count(t, "stop_token_ids entries", 0) for t in items))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Status(enum.Enum):
    WAITING = "waiting"      # queued, no slot (new, or preempted and to be recomputed)
    RUNNING = "running"      # holds a slot and blocks
    FINISHED = "finished"


@dataclass(eq=False)     # a request is itself: list membership / removal by identity
class Request:
    """One sequence in the runtime (host-side bookkeeping).

    ``num_computed`` tokens of ``token_ids`` (prompt + generated) are in the cache; the next
    step feeds ``token_ids[num_computed:]`` (a prefill chunk, or the last sampled token).

    With the overlapped loop (``Engine(overlap=True)``) a step is launched before the host has
    read the tokens of the step before it: ``num_pending`` tokens (0, 1, or 2 for a moment
    inside ``Engine.step``) were sampled on the device and not yet read; they count in
    ``num_tokens``, and the next decode row of the request takes its input token from row
    ``pending_index`` of the in-flight step's sampled ids, on the device.
    """

    prompt_ids: list[int]
    params: SamplingParams
    eos_token_id: Optional[int]
    request_id: str = field(default_factory=lambda: new_request_id())
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    slot: Optional[int] = None
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    generator: Optional[torch.Generator] = None
    arrival: int = field(default_factory=lambda: next(_ids))
    logits_returned: int = 0     # positions whose logits step(logits="all") returned
    num_pending: int = 0         # tokens sampled on the device, not yet read by the host
    pending_index: Optional[int] = None   # the latest one's row in its step's sampled ids

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, n: int) -> list[int]:
        """``token_ids[start:start + n]`` without joining prompt and output (a decode step
        reads one token of a possibly 1M-token context)."""
        p = len(self.prompt_ids)
        if start >= p:
            return self.output_ids[start - p:start - p + n]
        return self.prompt_ids[start:start + n] + self.output_ids[:max(0, start + n - p)]

    @property
    def num_tokens(self) -> int:
        """Prompt + generated tokens, the ones sampled but not yet read included."""
        return len(self.prompt_ids) + len(self.output_ids) + self.num_pending

    @property
    def last_token_pending(self) -> bool:
        """Its last possible token is sampled but not read (max_new_tokens reached): the
        request has nothing more to feed and finishes when the host reads it."""
        return bool(self.num_pending) and (len(self.output_ids) + self.num_pending
                                           >= self.params.max_new_tokens)

    @property
    def remaining(self) -> int:
        """Tokens known but not yet in the cache."""
        return self.num_tokens - self.num_computed


class TokenPrefix(NamedTuple):
    """The first ``n`` tokens of a request's output list, without copying them: the list only
    grows (``Engine`` appends), so the prefix stays what it was when it was taken."""

    tokens: list
    n: int


@dataclass
class RequestOutput:
    """What one ``Engine.step`` produced for a request.

    new_token_ids: tokens generated in this step (0 or 1; an EOS is not included);
    token_ids: every token generated so far (without EOS; a list built when first read, so a
    step does not copy every request's tokens); finished / finish_reason:
    ``"eos"``, ``"stop"`` (a stop token), ``"length"`` (max_new_tokens: ``add_request`` refuses
    a request that could outgrow max_model_len) or ``"error"`` (``error`` says why); a request
    ended by ``Engine.abort`` gets no further output; logits: with ``Engine.step(logits=...)``,
    float32 [tokens, vocab] on the device (the sampled position, or every token fed this
    step), else None.
    """

    request_id: str
    new_token_ids: list[int]
    token_ids: list[int]     # a list, or a TokenPrefix turned into one when read
    finished: bool
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    logits: Optional[torch.Tensor] = None


def _get_token_ids(self) -> list[int]:
    ids = self._token_ids
    if isinstance(ids, TokenPrefix):
        ids = self._token_ids = ids.tokens[:ids.n]
    return ids


def _set_token_ids(self, ids) -> None:
    self._token_ids = ids


# After @dataclass: its __init__, __eq__ and __repr__ go through the property.
RequestOutput.token_ids = property(_get_token_ids, _set_token_ids)
