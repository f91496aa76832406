"""Sampling and the single-sequence generation loop (architecture.md §13.1).

The loop is the reference ``inference/generate.py`` for one prompt: one prefill call with the
whole prompt, then one decode call per token with ``[1, 1]`` inputs, stopping at EOS (id 1) or
``max_new_tokens``. Sampling is the reference's: ``logits / max(T, 1e-5)``, softmax in fp32,
then the Gumbel-max trick (divide by Exp(1) noise, argmax), which draws from the softmax
distribution without ``torch.multinomial``'s host sync; ``T = 0`` is argmax. Top-k and top-p
(nucleus) filtering, which the reference does not have, are applied to the scaled logits before
the softmax, in the order of Hugging Face's ``TopKLogitsWarper`` / ``TopPLogitsWarper``.

The model contract (``dsv4.model.Model``): ``cache = model.make_cache(batch_size)``;
``logits = model(input_ids, cache=cache, seq_lens=None)`` with ``input_ids`` int64
``[batch, seq]`` and ``logits`` float32 ``[batch, seq, vocab]``; the call advances the cache by
``seq`` tokens.
"""

from __future__ import annotations

import math
import numbers
import operator
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .argtypes import check_seed
from .cache import as_int, check_count

__all__ = ["GenerationResult", "check_eos_id", "check_generate_args", "check_sampling_args", "format_rates", "generate", "sample"]

FinishReason = Literal["eos", "length", "stop"]

_MIN_TEMPERATURE = 1e-5  # the reference's max(T, 1e-5) (architecture.md §13.1)


def check_sampling_args(temperature: float, top_p: float, top_k: int
                        ) -> tuple[float, float, int]:
    """Validate sampling parameters; returns them as python ``(float, float, int)``.

    Numbers are python or numpy scalars alike: ``temperature`` and ``top_p`` ints or floats,
    ``top_k`` an int; a bool is none of them (as for every count of dsv4).

    Raises:
        ValueError: ``temperature`` is not a finite number ≥ 0; ``top_p`` is not in (0, 1];
            ``top_k`` is not an integer ≥ 0 (0 = no top-k filtering).
    """
    def real(v) -> bool:
        return isinstance(v, numbers.Real) and not isinstance(v, bool)

    if not (real(temperature) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy; not a bool), "
                         f"got {temperature!r}")
    if not (real(top_p) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] (1 = off; a number, not a bool), got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    return float(temperature), float(top_p), int(top_k)


def _check_finite(logits: torch.Tensor) -> None:
    """ValueError naming the first row with NaN / +inf logits or without a finite one."""
    bad = torch.isnan(logits) | (logits == float("inf"))
    empty = ~(logits > float("-inf")).any(-1) if logits.shape[-1] else torch.ones(
        logits.shape[0], dtype=torch.bool, device=logits.device)
    rows = bad.any(-1) | empty
    if not bool(rows.any()):
        return
    r = int(rows.nonzero()[0])
    if bool(bad[r].any()):
        i = int(bad[r].nonzero()[0])
        raise ValueError(f"logits row {r} holds {float(logits[r, i])} at token {i} "
                         f"({int(bad[r].sum())} non-finite values): the model produced "
                         "non-finite logits (NaN/inf), no token can be sampled")
    raise ValueError(f"logits row {r} has no finite value (every token is -inf): no token "
                     "can be sampled")


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    *,
    check_finite: bool = True,
) -> torch.Tensor:
    """Draw one token id per row from next-token logits.

    ``T == 0``: argmax (greedy; top-k/top-p cannot change it). Otherwise
    ``z = logits / max(T, 1e-5)``; if ``top_k > 0``, logits below the k-th largest are set to
    -inf (ties at the k-th value are kept); if ``top_p < 1``, the nucleus is the smallest set of
    highest-probability tokens whose cumulative probability (of ``softmax(z)`` after top-k) is
    ≥ ``top_p`` -- always at least the most probable token -- and the rest is set to -inf;
    ``p = softmax(z)`` in fp32; ``id = argmax(p / E)`` with ``E ~ Exp(1)`` i.i.d., which is an
    exact draw from ``p`` (Gumbel-max trick, the reference's ``sample``, architecture.md §13.1).

    Args:
        logits: ``[batch, vocab]``, any float dtype (computed in fp32).
        temperature: ≥ 0; 0 selects greedy decoding.
        top_p: in (0, 1]; 1 disables nucleus filtering.
        top_k: ≥ 0; 0 disables top-k filtering.
        generator: ``torch.Generator`` on ``logits.device`` for the Exp(1) noise
            (``None`` → the global RNG).
        check_finite: validate the rows first (the ValueError below; one host
            synchronisation). ``False`` skips it, for a caller that checks finiteness on the
            device itself (``dsv4.runtime``'s sampler flags such rows and fails their
            requests): the draw then makes no host synchronisation, and a row with NaN / +inf
            or without a finite logit gets an arbitrary id.

    Returns:
        ``[batch]`` int64 token ids on ``logits.device``.

    Raises:
        ValueError: invalid sampling arguments (see :func:`check_sampling_args`);
            ``logits`` is not a 2-D floating-point tensor; a row holds NaN or +inf, or has no
            finite logit (all -inf): no token can be drawn from it, and argmax would silently
            return token 0. (-inf entries, i.e. masked tokens, are fine.) The check makes one
            host synchronisation.
    """
    temperature, top_p, top_k = check_sampling_args(temperature, top_p, top_k)
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a floating-point [batch, vocab] tensor, got {tuple(logits.shape)} "
            f"{logits.dtype}"
        )
    if check_finite:
        _check_finite(logits)
    if temperature == 0:
        return logits.argmax(dim=-1)

    z = logits.float() / max(float(temperature), _MIN_TEMPERATURE)
    vocab = z.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, sorted_idx = torch.sort(z, dim=-1, descending=True)
        sorted_p = torch.softmax(sorted_z, dim=-1)
        # Remove a token when the tokens before it already reach top_p; the first never is.
        remove_sorted = (torch.cumsum(sorted_p, dim=-1) - sorted_p) >= top_p
        remove_sorted[..., 0] = False   # (a top_p below fp32's range compares as 0 >= 0)
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        z = z.masked_fill(remove, float("-inf"))
    probs = torch.softmax(z, dim=-1, dtype=torch.float32)
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    # Exp(1) noise of exactly 0 would turn a filtered 0 probability into 0/0 = NaN, which
    # argmax selects; clamping to the smallest normal float changes nothing else.
    noise.clamp_min_(torch.finfo(torch.float32).tiny)
    return probs.div(noise).argmax(dim=-1)


@dataclass
class GenerationResult:
    """Outcome of :func:`generate`.

    Attributes:
        token_ids: generated ids, without the prompt and without a final EOS.
        text: decoded ``token_ids`` (cut before a matched stop string) if a tokenizer was
            given, else ``None``.
        prompt_tokens: number of prompt ids fed to the prefill call.
        new_tokens: number of tokens sampled, a final EOS included.
        seconds: wall time of prefill + decode, in seconds.
        prefill_seconds: wall time of the prefill call and the first sample, in seconds.
        tokens_per_second: ``new_tokens / seconds`` (prefill included; see the rates below).

    Properties: ``decode_seconds`` (``seconds - prefill_seconds``), ``prefill_tokens_per_second``
    (prompt tokens processed per second by the prefill call), ``decode_tokens_per_second``
    (tokens generated per second after the first, ``(new_tokens - 1) / decode_seconds``; 0.0
    without a decode step).
        finish_reason: ``'eos'`` (EOS sampled), ``'length'`` (``max_new_tokens`` reached) or
            ``'stop'`` (a stop string appeared in the text).
    """

    token_ids: list[int]
    text: str | None
    prompt_tokens: int
    new_tokens: int
    seconds: float
    tokens_per_second: float
    finish_reason: FinishReason
    prefill_seconds: float = field(default=0.0)

    @property
    def decode_seconds(self) -> float:
        return max(0.0, self.seconds - self.prefill_seconds)

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(0, self.new_tokens - 1)
        return steps / self.decode_seconds if steps and self.decode_seconds > 0 else 0.0


#: Seeds are integers in [0, SEED_LIMIT): what ``torch.Generator.manual_seed`` takes (the
#: ``seed`` of :func:`generate`, of ``dsv4.runtime.SamplingParams`` and ``dsv4 generate --seed``).
SEED_LIMIT = 2 ** 64


def check_positions(config: Any, prompt_len: int, max_new_tokens: int,
                    name: str = "max_new_tokens") -> None:
    """The position rule of a generation (:func:`generate`, ``dsv4.runtime.generate`` and
    ``dsv4 generate``): prompt + ``max_new_tokens`` within ``config.max_position_embeddings``
    (no rule for a config without one, or None); ValueError naming the largest
    ``max_new_tokens`` accepted otherwise (``name``: what the caller calls it)."""
    max_pos = getattr(config, "max_position_embeddings", None)
    if isinstance(max_pos, int) and prompt_len + max_new_tokens > max_pos:
        raise ValueError(f"the prompt ({prompt_len} tokens) + {name} ({max_new_tokens}) "
                         f"exceeds the model's max_position_embeddings ({max_pos}); "
                         f"{name} accepts at most {max(0, max_pos - prompt_len)} here")


def check_generate_args(prompt_ids: Sequence[int], max_new_tokens: int, temperature: float,
                        top_p: float, top_k: int, stop_strings: Sequence[str] | str,
                        tokenizer: Any | None, seed: int | None = None
                        ) -> tuple[list[int], list[str]]:
    """The argument checks of :func:`generate` (and ``dsv4.runtime.generate``): returns the
    prompt as a list of ints and the stop strings as a list.

    Raises:
        ValueError: invalid sampling arguments, ``max_new_tokens`` not an integer >= 0, an
            empty prompt, a prompt id that is not an integer >= 0, an empty stop string,
            ``stop_strings`` without a tokenizer, or a seed outside [0, 2**64).
    """
    check_sampling_args(temperature, top_p, top_k)
    check_count(max_new_tokens, "max_new_tokens", 0)   # numpy / 0-d torch ints as SamplingParams
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() != 1 or prompt_ids.is_floating_point() or prompt_ids.is_complex():
            raise ValueError(f"prompt_ids must be a 1-D integer tensor or a list of ints, got "
                             f"{prompt_ids.dtype} {list(prompt_ids.shape)}")
        prompt = prompt_ids.tolist()
    else:
        prompt = list(prompt_ids)
        bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, numbers.Integral)]
        if bad:
            raise ValueError(f"prompt_ids must hold integer token ids, got {bad[0]!r}")
        prompt = [int(t) for t in prompt]
    if not prompt:
        raise ValueError("prompt_ids must contain at least one token (e.g. BOS)")
    if min(prompt) < 0:
        raise ValueError(f"prompt_ids must be >= 0, got {min(prompt)}")
    stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
    if any(not isinstance(t, str) or not t for t in stops):
        raise ValueError(f"stop_strings must be non-empty strings, got {stops!r}")
    if stops and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the generated text")
    if seed is not None:
        check_seed(seed, SEED_LIMIT)
    return prompt, stops


def check_eos_id(eos_id: Any) -> int | None:
    """``eos_id`` of :func:`generate` (and ``dsv4.runtime.generate``) as a python int, or None.

    Any integer (python, numpy or a 0-d torch integer) is accepted; one outside the vocabulary
    never matches a sampled id. Anything else (a string, a float, a bool) would silently
    never match (or, for ``True``, match id 1), so it is refused.

    Raises:
        ValueError: ``eos_id`` is not None and not an integer.
    """
    if eos_id is None:
        return None
    return as_int(eos_id, "eos_id", "None or an integer (a token id; None = never stop at EOS)")


def _final_text(decoder, stops, finish: str, on_token) -> str | None:
    """The generated text once generation ended (None without a tokenizer): the decoder's held
    bytes unless a stop string ended it, the stop-string filter's held-back tail passed to
    ``on_token(-1, tail)``, the text cut at the stop string."""
    if decoder is None:
        return None
    if finish != "stop":
        stops.push(decoder.flush())
    tail = stops.finish()
    if tail and on_token is not None:
        on_token(-1, tail)
    return stops.text if stops.stop_at is None else stops.text[: stops.stop_at]


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        try:
            return next(model.buffers()).device
        except StopIteration:
            return torch.device("cpu")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StopStringFilter:
    """Holds back streamed text that could be the start of a stop string."""

    def __init__(self, stop_strings: Sequence[str]) -> None:
        self.stop_strings = [s for s in stop_strings if s]
        self.text = ""  # all decoded text so far
        self.emitted = 0  # chars of self.text passed on
        self.stop_at: int | None = None  # index in self.text where the first stop string starts

    def push(self, piece: str) -> str:
        """Append decoded text; return the part that is safe to emit now."""
        if self.stop_at is not None:
            return ""
        start = max(0, len(self.text) - max((len(s) for s in self.stop_strings), default=0))
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stop_strings) if i >= 0]
        if hits:
            self.stop_at = min(hits)
            return self._emit_until(self.stop_at)
        hold = 0
        for s in self.stop_strings:  # longest suffix of text that is a proper prefix of s
            for n in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:n]):
                    hold = n
                    break
        return self._emit_until(len(self.text) - hold)

    def finish(self) -> str:
        """Return everything not yet emitted (up to a stop string, if one was found)."""
        return self._emit_until(len(self.text) if self.stop_at is None else self.stop_at)

    def _emit_until(self, end: int) -> str:
        out = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out


def generate(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    eos_id: int | None = 1,
    stop_strings: Sequence[str] = (),
    on_token: Callable[[int, str], Any] | None = None,
    tokenizer: Any | None = None,
) -> GenerationResult:
    """Generate a continuation of one prompt (reference loop, architecture.md §13.1).

    ``cache = model.make_cache(1)``; one prefill call ``model(ids[1, P], cache=cache)``; then,
    while the last sampled token is not EOS and fewer than ``max_new_tokens`` were sampled, one
    decode call ``model(ids[1, 1], cache=cache)``; the next token is sampled from the last
    position's logits with :func:`sample`. No model call follows the last sampled token, so a run
    that samples ``n`` tokens makes ``1 + (n - 1)`` calls. Runs under ``torch.no_grad()`` on the
    device of the model's parameters.

    Args:
        model: a ``dsv4.model.Model`` or anything with ``make_cache(batch_size)`` and
            ``__call__(input_ids, cache=..., seq_lens=None) -> logits [batch, seq, vocab]``.
        prompt_ids: prompt token ids (with BOS, see ``dsv4.tokenizer.encode_prompt``), length ≥ 1.
        max_new_tokens: maximum number of tokens to sample (≥ 0; 0 makes no model call).
        temperature, top_p, top_k: see :func:`sample`.
        seed: seeds a ``torch.Generator`` on the model's device, making sampled runs
            reproducible; ``None`` → a nondeterministic seed. An int in [0, 2**64); torch's
            CPU generator (mt19937) keeps its low 32 bits, so on the CPU seeds that differ
            only above bit 32 draw the same tokens (CUDA's Philox keeps all 64).
        eos_id: generation stops when this id is sampled; it is neither returned nor passed to
            ``on_token``. ``None`` disables EOS stopping (as does an id outside the
            vocabulary); anything but None or an integer is a ValueError.
        stop_strings: generation stops once the decoded text contains one of them; the text is
            cut before it (needs ``tokenizer``). Streamed text that might begin a stop string is
            held back until it is decided.
        on_token: called as ``on_token(token_id, text)`` for each generated non-EOS token, in
            order; ``text`` is the newly printable text (``""`` while a UTF-8 character or a
            possible stop string is incomplete, or without a tokenizer). After the last token,
            it may be called once more with ``token_id = -1`` and the held-back remainder.
        tokenizer: a ``tokenizers.Tokenizer`` for ``text``/streaming; ``None`` → ids only.

    Returns:
        :class:`GenerationResult`.

    Raises:
        ValueError: invalid sampling arguments, ``max_new_tokens < 0``, an empty prompt, a
            negative prompt id, an ``eos_id`` that is not None or an integer
            (:func:`check_eos_id`), ``stop_strings`` without a tokenizer, or a prompt +
            ``max_new_tokens`` beyond the model's ``config.max_position_embeddings``.
    """
    prompt, stop_strings = check_generate_args(prompt_ids, max_new_tokens, temperature, top_p,
                                               top_k, stop_strings, tokenizer, seed)
    eos_id = check_eos_id(eos_id)
    max_new_tokens = operator.index(max_new_tokens)
    check_positions(getattr(model, "config", None), len(prompt), max_new_tokens)

    from dsv4.tokenizer import StreamDecoder  # local: keeps `tokenizers` optional for ids-only use

    device = _model_device(model)
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    decoder = StreamDecoder(tokenizer) if tokenizer is not None else None
    stops = _StopStringFilter(stop_strings)

    token_ids: list[int] = []
    finish: FinishReason = "length"
    new_tokens = 0
    prefill_seconds = 0.0
    _synchronize(device)
    t0 = time.perf_counter()
    if max_new_tokens > 0:
        with torch.no_grad():
            cache = model.make_cache(1)
            inputs = torch.tensor([prompt], dtype=torch.long, device=device)
            from .model import Model  # only the last position's logits are sampled from
            last = {"logits": "last"} if isinstance(model, Model) else {}
            while True:
                logits = model(inputs, cache=cache, seq_lens=None, **last)
                next_id = sample(logits[:, -1, :], temperature, top_p, top_k, generator)
                token = int(next_id.item())  # host sync: needed for EOS / streaming
                new_tokens += 1
                if new_tokens == 1:
                    prefill_seconds = time.perf_counter() - t0
                if eos_id is not None and token == eos_id:
                    finish = "eos"
                    break
                token_ids.append(token)
                piece = ""
                if decoder is not None:
                    piece = stops.push(decoder.step(token))
                if on_token is not None:
                    on_token(token, piece)
                if stops.stop_at is not None:
                    finish = "stop"
                    break
                if new_tokens >= max_new_tokens:
                    break
                inputs = next_id.view(1, 1)
    _synchronize(device)
    seconds = time.perf_counter() - t0

    text = _final_text(decoder, stops, finish, on_token)
    return GenerationResult(
        token_ids=token_ids,
        text=text,
        prompt_tokens=len(prompt),
        new_tokens=new_tokens,
        seconds=seconds,
        tokens_per_second=new_tokens / seconds if seconds > 0 else 0.0,
        finish_reason=finish,
        prefill_seconds=prefill_seconds,
    )


def format_rates(result: GenerationResult) -> str:
    """The statistics line of ``dsv4 generate``: prefill and decode rates reported separately
    (a long prompt's prefill would otherwise swamp the generation rate).

    ``[prompt tokens: P, new tokens: N, prefill: R tokens/s (S s), decode: R tokens/s (S s),
    finish: eos|length|stop]``; the decode part reads ``decode: n/a`` when only one token was
    generated (no decode step).
    """
    decode = (f"{result.decode_tokens_per_second:.1f} tokens/s ({result.decode_seconds:.2f} s)"
              if result.new_tokens > 1 else "n/a")
    return (f"[prompt tokens: {result.prompt_tokens}, new tokens: {result.new_tokens}, "
            f"prefill: {result.prefill_tokens_per_second:.1f} tokens/s "
            f"({result.prefill_seconds:.2f} s), decode: {decode}, "
            f"finish: {result.finish_reason}]")
