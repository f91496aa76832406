"""dsv4.runtime.generate (what `dsv4 generate` runs on a GPU) against dsv4.generate.generate
on CPU: the same argument checks and, greedy in fp32, the same tokens."""

from __future__ import annotations

import pytest
import torch

import dsv4
from dsv4.generate import generate as model_generate
from dsv4.runtime.generate import generate as engine_generate


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return dsv4.Model(dsv4.ModelConfig.tiny()).eval()


@pytest.mark.parametrize("prompt", [[0, 5, 17, 99, 3, 42], list(range(3, 140))])
def test_greedy_tokens_equal_the_model_loop(model, prompt):
    a = engine_generate(model, prompt, 8)
    b = model_generate(model, prompt, 8)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 8


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompt_ids=[], max_new_tokens=3), "at least one token"),
    (dict(prompt_ids=[1, -2], max_new_tokens=3), ">= 0"),
    (dict(prompt_ids=[1], max_new_tokens=-1), "max_new_tokens"),
    (dict(prompt_ids=[1], max_new_tokens=2, top_p=0.0), "top_p"),
    (dict(prompt_ids=[1], max_new_tokens=2, stop_strings=["x"]), "tokenizer"),
    (dict(prompt_ids=[1, 2.7], max_new_tokens=2), "integer token ids"),
    (dict(prompt_ids=torch.tensor([1.0, 2.0]), max_new_tokens=2), "integer tensor"),
    (dict(prompt_ids=[1], max_new_tokens=2, stop_strings=[""]), "non-empty strings"),
    (dict(prompt_ids=[1], max_new_tokens=2, seed=2 ** 64), r"\[0, 2\*\*64\)"),
    (dict(prompt_ids=[1], max_new_tokens=2, seed=-1), r"\[0, 2\*\*64\)"),
])
def test_the_same_argument_errors(model, kwargs, match):
    for fn in (engine_generate, model_generate):
        with pytest.raises(ValueError, match=match):
            fn(model, **kwargs)


def test_integer_containers_are_accepted(model):
    import numpy as np
    want = model_generate(model, [4, 8, 15], 3).token_ids
    for ids in (torch.tensor([4, 8, 15]), np.array([4, 8, 15]), (4, 8, 15)):
        assert engine_generate(model, ids, 3).token_ids == want
        assert model_generate(model, ids, 3).token_ids == want


def test_eos_ids_that_cannot_be_sampled_are_accepted_alike(model):
    """An eos_id outside the vocabulary never matches in generate(); the engine's request
    refuses such an id, so runtime.generate passes "never" (-1) for it: the same tokens."""
    want = model_generate(model, [4, 8, 15], 3, eos_id=None).token_ids
    for eos in (model.config.vocab_size, 10 ** 9, -5):
        assert engine_generate(model, [4, 8, 15], 3, eos_id=eos).token_ids == want
        assert model_generate(model, [4, 8, 15], 3, eos_id=eos).token_ids == want


@pytest.mark.parametrize("eos", ["1", 1.0, True, [1]])
def test_eos_id_that_is_not_an_integer_is_refused_alike(model, eos):
    """eos_id is None or a token id: a string or a float never equalled a sampled id in the
    model loop (EOS silently off), True equalled id 1, and the engine's path raised a
    TypeError from a comparison (or named SamplingParams' field). Both refuse it, naming
    eos_id, before any model call."""
    for fn in (engine_generate, model_generate):
        with pytest.raises(ValueError, match=r"eos_id must be None or an integer"):
            fn(model, [4, 8, 15], 2, eos_id=eos)


def test_integer_like_counts_are_accepted_alike(model):
    """numpy / 0-d torch integers for max_new_tokens and eos_id, as SamplingParams, the seed
    and the prompt ids take them (the model loop refused max_new_tokens=np.int64(3) as "not an
    integer >= 0")."""
    import numpy as np
    want = model_generate(model, [4, 8, 15], 3, eos_id=None)
    eos = want.token_ids[1]        # stops at the second token
    for n, e in ((np.int64(3), np.int64(eos)), (torch.tensor(3), torch.tensor(eos))):
        for fn in (engine_generate, model_generate):
            r = fn(model, [4, 8, 15], n, eos_id=e)
            cut = want.token_ids.index(eos)
            assert r.token_ids == want.token_ids[:cut] and r.finish_reason == "eos"


def test_non_finite_logits_are_the_same_error_as_the_model_loop():
    """A model whose logits are NaN: generate() raises the sampler's ValueError; the engine's
    path raised a RuntimeError, which `dsv4 generate` on a GPU (it catches ValueError) printed
    as a traceback. Both raise ValueError saying the model produced non-finite values."""
    torch.manual_seed(0)
    nan_model = dsv4.Model(dsv4.ModelConfig.tiny()).eval()
    with torch.no_grad():
        nan_model.norm.weight.fill_(float("nan"))
    for fn in (engine_generate, model_generate):
        with pytest.raises(ValueError, match=r"the model produced non-finite logits"):
            fn(nan_model, [4, 8, 15], 3)


def test_stop_strings_stop_the_engine_loop_as_the_model_loop(model):
    """The engine loop's stop-string path (what `dsv4 generate --stop` runs on a GPU) gives the
    model loop's tokens, text and finish reason; no test reached it (a loop that never stopped
    passed). The stop string is cut from the middle of the greedy continuation."""
    from dsv4.tokenizer import load_tokenizer
    tok = load_tokenizer()
    prompt = [0, 5, 17, 99, 3, 42]
    full = model_generate(model, prompt, 12, tokenizer=tok, eos_id=None)
    assert full.finish_reason == "length" and len(full.text) >= 4, full.text
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 2]
    a = engine_generate(model, prompt, 12, tokenizer=tok, eos_id=None, stop_strings=[stop])
    b = model_generate(model, prompt, 12, tokenizer=tok, eos_id=None, stop_strings=[stop])
    assert b.finish_reason == "stop" and stop not in b.text and len(b.token_ids) < 12
    assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)


def test_eos_id_0_stops_both_loops():
    """Token 0 as EOS: the engine loop stops like the model loop (a rule reading 0 as 'no EOS'
    passed every test). A zero head makes every logit 0, so greedy picks token 0."""
    torch.manual_seed(0)
    m = dsv4.Model(dsv4.ModelConfig.tiny()).eval()
    with torch.no_grad():
        m.head.weight.zero_()
    a = engine_generate(m, [5, 6, 7], 4, eos_id=0)
    b = model_generate(m, [5, 6, 7], 4, eos_id=0)
    assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason) == ([], "eos")
    assert engine_generate(m, [5, 6, 7], 4, eos_id=None).token_ids == [0, 0, 0, 0]
