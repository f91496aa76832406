"""Tests of the ``dsv4`` command line (dsv4.cli)."""

from __future__ import annotations

import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import dsv4
from dsv4 import cli
from dsv4.tokenizer import default_tokenizer_path, encode_prompt, load_tokenizer

STATS_RE = re.compile(   # prefill and decode rates separately (groups 3: prefill rate)
    r"^\[prompt tokens: (\d+), new tokens: (\d+), prefill: (\d+\.\d) tokens/s \(\d+\.\d\d s\), "
    r"decode: (?:\d+\.\d tokens/s \(\d+\.\d\d s\)|n/a), finish: (eos|length|stop)\]$"
)
FIB = "def fibonacci(n):"


def _usage_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--top-p", "0"], r"top-p must be in \(0, 1\]"),
        (["--top-p", "1.01"], r"top-p must be in \(0, 1\]"),
        (["--temperature", "-1"], r"temperature must be a finite number >= 0"),
        (["--temperature", "nan"], r"temperature must be a finite number >= 0"),
        (["--top-k", "-1"], r"top-k must be an integer >= 0"),
        (["--max-new-tokens", "-5"], r"expected an integer >= 0"),
        (["--max-new-tokens", "ten"], r"expected an integer >= 0"),
        (["--dtype", "float16"], r"invalid choice: 'float16'"),
        (["--device", "nonsense"], r"argument --device: invalid device 'nonsense'; expected "
                                   r"cpu, or cuda / cuda:N"),
        (["--device", "mps"], r"argument --device: 'mps' is not supported; expected cpu, or "
                              r"cuda / cuda:N"),
        (["--device", "meta"], r"argument --device: 'meta' is not supported; expected cpu"),
        (["--device", "cpu:1"], r"argument --device: 'cpu:1' is not supported; expected cpu"),
        (["--device", "cuda:1000"], r"argument --device: 'cuda:1000' (requested but CUDA is "
                                    r"not available|: this machine has \d+ CUDA device)"),
        (["--seed", "99999999999999999999999"], r"argument --seed: must be in \[0, 2\*\*64\)"),
        (["--seed", str(2 ** 64)], r"argument --seed: must be in \[0, 2\*\*64\)"),
        (["--quant-sim", "maybe"], r"invalid choice: 'maybe'"),
        (["--stop", ""], r"argument --stop: expected a non-empty text"),
    ],
)
def test_generate_argument_errors(capsys, monkeypatch, extra, message):
    monkeypatch.setattr(cli, "_load_model", _no_model)
    err = _usage_error(capsys, ["generate", "--prompt", "x", *extra])
    assert re.search(message, err), err
    assert "usage: dsv4 generate" in err


def test_seed_takes_every_seed_generate_takes():
    """--seed accepts what dsv4.generate.generate / SamplingParams accept (a torch.Generator
    seed: [0, 2**64)); it refused [2**63, 2**64) with its own bound."""
    for seed in (0, 2 ** 63, 2 ** 64 - 1):
        args = cli.build_parser().parse_args(["generate", "--prompt", "x", "--seed", str(seed)])
        assert args.seed == seed


def _no_model(*a, **k):
    raise AssertionError("no model may be built on a usage error")


def test_missing_prompt_and_subcommand(capsys):
    assert "--prompt" in _usage_error(capsys, ["generate"])
    assert "required" in _usage_error(capsys, [])
    assert "invalid choice" in _usage_error(capsys, ["frobnicate"])


@pytest.mark.parametrize("preset", ["flash", "pro"])
def test_large_presets_need_a_checkpoint(capsys, monkeypatch, preset):
    monkeypatch.setattr(cli, "_load_model", _no_model)
    err = _usage_error(capsys, ["generate", "--model", preset, "--prompt", "x"])
    assert "too large to instantiate with random weights" in err
    assert "checkpoint directory" in err


def test_unknown_model(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "_load_model", _no_model)
    err = _usage_error(capsys, ["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"])
    assert "expected tiny, flash, pro or an existing checkpoint directory" in err


def test_missing_tokenizer_file(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "_load_model", _no_model)
    rc = cli.main(["generate", "--prompt", "x", "--device", "cpu", "--tokenizer", str(tmp_path)])
    assert rc == 1
    assert "tokenizer.json" in capsys.readouterr().err


def test_unreadable_tokenizer_file(capsys, monkeypatch, tmp_path):
    """A file that is not a tokenizer.json printed the tokenizers library's bare traceback;
    it is an error naming the file, as the other load errors are."""
    monkeypatch.setattr(cli, "_load_model", _no_model)
    bad = tmp_path / "tokenizer.json"
    for text in ("garbage", '{"not": "a tokenizer"}'):
        bad.write_text(text)
        with pytest.raises(ValueError, match=rf"cannot load tokenizer '{re.escape(str(bad))}'"):
            load_tokenizer(bad)
        for path in (bad, tmp_path):            # the file, or the directory holding it
            rc = cli.main(["generate", "--prompt", "x", "--device", "cpu", "--tokenizer",
                           str(path)])
            assert rc == 1
            cap = capsys.readouterr()
            assert cap.out == ""
            assert cap.err.startswith(f"dsv4 generate: error: cannot load tokenizer '{bad}': not "
                                      f"a tokenizer.json"), cap.err


class _ScriptedModel(torch.nn.Module):
    """Emits a fixed token list, then EOS (call contract of dsv4.model.Model)."""

    def __init__(self, script):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.script = script
        self.config = SimpleNamespace(bos_token_id=0, eos_token_id=1, vocab_size=129280)

    def make_cache(self, batch_size):
        return SimpleNamespace(pos=0, start=None)

    def forward(self, input_ids, cache=None, seq_lens=None):
        if cache.start is None:
            cache.start = input_ids.shape[1]
        cache.pos += input_ids.shape[1]
        logits = torch.zeros(*input_ids.shape, 129280)
        logits[:, -1, self.script[cache.pos - cache.start]] = 1.0
        return logits


class _FlushCounter(io.StringIO):
    def __init__(self):
        super().__init__()
        self.flushed = []

    def flush(self):
        self.flushed.append(self.getvalue())


def test_generate_output_format_with_fake_model(monkeypatch, capsys):
    tok = load_tokenizer()
    gen_text = "\n    return n if n < 2 else fib(n - 1)"
    script = tok.encode(gen_text, add_special_tokens=False).ids + [1]
    seen = {}

    def fake_load(model, device, dtype, quant_sim=None):
        seen.update(model=model, device=device, dtype=dtype)
        return _ScriptedModel(script)

    monkeypatch.setattr(cli, "_load_model", fake_load)
    out = _FlushCounter()
    monkeypatch.setattr(sys, "stdout", out)
    rc = cli.main(["generate", "--model", "tiny", "--prompt", FIB, "--device", "cpu"])
    assert rc == 0
    assert seen == {"model": "tiny", "device": torch.device("cpu"), "dtype": torch.float32}
    assert out.getvalue() == FIB + gen_text + "\n"
    # Streamed: the prompt is flushed first, then the text grows token by token.
    assert out.flushed[0] == FIB
    assert len(set(out.flushed)) >= len(script) - 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == cli.TINY_NOTICE and "seeded random weights" in err[0]
    m = STATS_RE.match(err[-1])
    assert m, err[-1]
    assert int(m.group(1)) == len(encode_prompt(tok, FIB))
    assert int(m.group(2)) == len(script) and m.group(4) == "eos"


def test_generate_length_and_stop(monkeypatch, capsys):
    tok = load_tokenizer()
    script = tok.encode(" one two three four five", add_special_tokens=False).ids + [1]
    monkeypatch.setattr(cli, "_load_model", lambda *a: _ScriptedModel(script))
    assert cli.main(["generate", "--prompt", "p", "--device", "cpu", "--max-new-tokens", "2",
                     "--temperature", "0.7", "--top-k", "1", "--seed", "3"]) == 0
    cap = capsys.readouterr()
    assert cap.out == "p one two\n"
    assert STATS_RE.match(cap.err.strip().splitlines()[-1]).group(2, 4) == ("2", "length")
    assert cli.main(["generate", "--prompt", "p", "--device", "cpu", "--stop", "three"]) == 0
    cap = capsys.readouterr()
    assert cap.out == "p one two \n"
    assert STATS_RE.match(cap.err.strip().splitlines()[-1]).group(4) == "stop"


@pytest.mark.parametrize("extra", [[], ["--chat"], ["--chat", "--system", "s\udcff"]])
def test_generate_prompt_bytes_that_are_not_utf8_are_a_usage_error(extra, capsys):
    """A command-line argument holding bytes that are not UTF-8 reaches Python as lone
    surrogates; the raw prompt path raised a traceback from the tokenizer."""
    prompt = "a\udcff" if "--system" not in extra else "a"
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--prompt", prompt, "--device", "cpu", *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "is not valid Unicode text" in err and "Traceback" not in err
    assert ("argument --system" if "--system" in extra else "argument --prompt") in err


def test_generate_refuses_a_model_vocabulary_past_the_tokenizer(monkeypatch, capsys):
    """Ids at or past the tokenizer's 129,280 have no text: a model that can sample them is
    refused before anything is printed (the stream decoder refuses such an id)."""
    model = _ScriptedModel([1])
    model.config.vocab_size = 129281
    monkeypatch.setattr(cli, "_load_model", lambda *a: model)
    assert cli.main(["generate", "--prompt", "p", "--device", "cpu"]) == 1
    cap = capsys.readouterr()
    assert cap.out == "" and ("the model's vocabulary (vocab_size 129281) is larger than the "
                              "tokenizer's (129280 with added tokens)") in cap.err


def test_generate_refuses_more_tokens_than_the_model_has_positions(monkeypatch, capsys):
    """--max-new-tokens 99999999999 on a CPU ran for days (no bound); prompt + new tokens beyond
    max_position_embeddings is refused before the prompt is printed, naming the most it takes."""
    model = _ScriptedModel([1])
    model.config.max_position_embeddings = 16
    monkeypatch.setattr(cli, "_load_model", lambda *a: model)
    n_prompt = len(encode_prompt(load_tokenizer(), "p"))
    assert cli.main(["generate", "--prompt", "p", "--device", "cpu",
                     "--max-new-tokens", "99999999999"]) == 1
    cap = capsys.readouterr()
    assert cap.out == ""
    assert (f"exceeds the model's max_position_embeddings (16); --max-new-tokens accepts at "
            f"most {16 - n_prompt} here") in cap.err
    assert cli.main(["generate", "--prompt", "p", "--device", "cpu",
                     "--max-new-tokens", str(16 - n_prompt)]) == 0
    assert capsys.readouterr().out.startswith("p")


def test_info_runs(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out  # format_info()'s header, or the fallback note's
    assert len(out.strip().splitlines()) >= 2


def test_format_config_summary():
    cfg = SimpleNamespace(n_layers=43, dim=4096, n_heads=64, vocab_size=129280,
                          compress_ratios=tuple([0, 0] + [4, 128] * 20 + [4] + [0]))
    s = cli.format_config_summary(cfg, "flash")
    assert "layers:" in s and "43" in s and "4096" in s
    assert "(SWA 2, CSA 21, HCA 20; +1 MTP)" in s


def test_info_model_preset(capsys):
    pytest.importorskip("dsv4.config", reason="dsv4.config not importable yet")
    assert cli.main(["info", "--model", "flash"]) == 0
    out = capsys.readouterr().out
    assert "model config (flash):" in out and "SWA 2, CSA 21, HCA 20" in out


def test_info_context_beyond_the_models_positions_is_refused(capsys):
    """--context 10**23 printed KV totals for ~1e23 tokens (and broke the table's header)."""
    assert cli.main(["info", "--model", "flash", "--context", str(10 ** 23)]) == 1
    out, err = capsys.readouterr()
    assert ("dsv4 info: error: argument --context: flash holds at most 1,048,576 tokens "
            "(max_position_embeddings), got 100,000,000,000,000,000,000,000") in err
    assert out == ""                     # refused before printing anything (it printed it all)
    from dsv4.model_info import format_model_info
    with pytest.raises(ValueError, match=r"context must be in \[1, 1,048,576\]"):
        format_model_info(dsv4.ModelConfig.flash(), context=(1 << 20) + 1)


@pytest.mark.parametrize("context, shown", [("64K", "at 65,536 tokens"), ("1m", "at 1M tokens"),
                                           ("4096", "at 4,096 tokens")])
def test_info_context_takes_the_sizes_bench_takes(capsys, context, shown):
    """dsv4 bench took --context 1M, dsv4 info refused it: one parser for both."""
    assert cli.main(["info", "--model", "flash", "--context", context]) == 0
    assert shown in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["info", "--model", "flash", "--context", "0K"])
    assert "expected a positive token count, got '0K'" in capsys.readouterr().err


def test_make_checkpoint_output_must_be_a_directory(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert cli.main(["make-checkpoint", "--config", "tiny", "--out", str(f)]) == 1
    err = capsys.readouterr().err
    assert f"the output must be a directory (new or existing), got '{f}': a file" in err
    assert "writing" not in err and f.read_text() == "x"
    from dsv4.synthetic import make_checkpoint
    with pytest.raises(ValueError, match="output must be a directory"):
        make_checkpoint(dsv4.ModelConfig.tiny(), "")
    with pytest.raises(ValueError, match="tokenizer must be a path, None"):
        make_checkpoint(dsv4.ModelConfig.tiny(), tmp_path / "o", tokenizer=True)
    with pytest.raises(TypeError, match="config must be a dsv4.ModelConfig, got dict"):
        make_checkpoint({"dim": 8}, tmp_path / "o")
    for bad in ({}, "tiny"):
        with pytest.raises(TypeError, match=r"config must be a dsv4.ModelConfig \(e.g."):
            dsv4.Model(bad)
    assert not (tmp_path / "o").exists()


def _model_importable() -> bool:
    try:
        return importlib.util.find_spec("dsv4.model") is not None and bool(
            __import__("dsv4.model", fromlist=["Model"]).Model
        )
    except Exception:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _model_importable(), reason="dsv4.model (Model) cannot be imported yet")
def test_end_to_end_tiny_generate():
    """The real `dsv4 generate --model tiny` on seeded random weights: checks the output format."""
    env = dict(os.environ)
    pkg_root = os.path.dirname(list(dsv4.__path__)[0])  # import the same dsv4 as this process
    env["PYTHONPATH"] = pkg_root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "dsv4.cli", "generate", "--model", "tiny", "--prompt", FIB,
         "--max-new-tokens", "4"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert err[0] == cli.TINY_NOTICE
    m = STATS_RE.match(err[-1])
    assert m, proc.stderr
    prompt_tokens, new_tokens, _, finish = m.groups()
    assert int(prompt_tokens) == len(encode_prompt(load_tokenizer(), FIB))
    assert (int(new_tokens), finish) == (4, "length") or (int(new_tokens) <= 4 and finish == "eos")
    assert proc.stdout.startswith(FIB) and proc.stdout.endswith("\n")


@pytest.mark.slow
@pytest.mark.skipif(not _model_importable(), reason="dsv4.model (Model) cannot be imported yet")
def test_checkpoint_dir_matches_tiny(tmp_path, capsys):
    """`--model DIR` (from_pretrained + the directory's tokenizer.json) reproduces `--model tiny`."""
    from dsv4.config import ModelConfig
    from dsv4.model import Model

    torch.manual_seed(cli.TINY_SEED)
    Model(ModelConfig.tiny()).save_pretrained(tmp_path)
    shutil.copy(default_tokenizer_path(), tmp_path / "tokenizer.json")
    outs = []
    for model in ("tiny", str(tmp_path)):
        argv = ["generate", "--model", model, "--prompt", FIB, "--max-new-tokens", "3",
                "--device", "cpu"]
        assert cli.main(argv) == 0
        cap = capsys.readouterr()
        assert STATS_RE.match(cap.err.strip().splitlines()[-1])
        outs.append(cap.out)
    assert outs[0] == outs[1] and outs[0].startswith(FIB)


def test_generate_bad_checkpoint_is_a_clean_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert cli.main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert "dsv4 generate: error: cannot load" in err and "missing required keys" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------- generate --chat


class _RecordingModel(_ScriptedModel):
    """_ScriptedModel that records the ids of its first (prefill) call."""

    def __init__(self, script):
        super().__init__(script)
        self.prefill_ids = None

    def forward(self, input_ids, cache=None, seq_lens=None):
        if self.prefill_ids is None:
            self.prefill_ids = input_ids[0].tolist()
        return super().forward(input_ids, cache=cache, seq_lens=seq_lens)


def _chat_run(monkeypatch, completion, argv, tty=False, env_no_color=False):
    from dsv4.chat import EOS

    tok = load_tokenizer()
    script = tok.encode(completion, add_special_tokens=False).ids + [tok.token_to_id(EOS)]
    model = _RecordingModel(script)
    monkeypatch.setattr(cli, "_load_model", lambda *a, **k: model)
    out = _FlushCounter()
    out.isatty = lambda: tty
    monkeypatch.setattr(sys, "stdout", out)
    if env_no_color:
        monkeypatch.setenv("NO_COLOR", "1")
    else:
        monkeypatch.delenv("NO_COLOR", raising=False)
    rc = cli.main(["generate", "--device", "cpu", "--chat", *argv])
    return rc, out, model, tok


@pytest.mark.parametrize("mode", ["think-high", "think-max"])
def test_generate_chat_thinking_modes(monkeypatch, capsys, mode):
    from dsv4.chat import encode_chat

    reasoning, answer = "The user asks 2+2. Simple.", "2 + 2 = 4."
    rc, out, model, tok = _chat_run(monkeypatch, reasoning + "</think>" + answer,
                                    ["--mode", mode, "--system", "Be brief.", "--prompt", "What is 2+2?"])
    assert rc == 0
    want = encode_chat(tok, [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "What is 2+2?"}], mode=mode)
    assert model.prefill_ids == want
    assert model.prefill_ids[-1] == tok.token_to_id("<think>")
    assert ("Reasoning Effort: Absolute maximum" in tok.decode(want)) == (mode == "think-max")
    assert out.getvalue() == f"[reasoning]\n{reasoning}\n[answer]\n{answer}\n"  # prompt not echoed
    assert "\x1b[" not in out.getvalue()  # not a terminal: no colour codes
    m = STATS_RE.match(capsys.readouterr().err.strip().splitlines()[-1])
    assert m and int(m.group(1)) == len(want) and m.group(4) == "eos"


def test_generate_chat_mode_and_tool_calls(monkeypatch, capsys):
    dsml = ("<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"x\" "
            "string=\"true\">v</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>")
    rc, out, model, tok = _chat_run(monkeypatch, "Let me look.\n\n" + dsml, ["--prompt", "Q"])
    assert rc == 0
    from dsv4.chat import encode_chat

    assert model.prefill_ids == encode_chat(tok, [{"role": "user", "content": "Q"}], mode="chat")
    assert model.prefill_ids[-1] == tok.token_to_id("</think>")
    assert out.getvalue() == f"Let me look.\n[tool calls]\n{dsml}\n"  # chat mode: no [answer] header


def test_generate_chat_dims_reasoning_on_a_terminal(monkeypatch, capsys):
    rc, out, _, _ = _chat_run(monkeypatch, "hmm</think>ok", ["--mode", "think-high", "--prompt", "Q"], tty=True)
    assert rc == 0 and out.getvalue() == "[reasoning]\n\x1b[2mhmm\x1b[0m\n[answer]\nok\n"
    rc, out, _, _ = _chat_run(monkeypatch, "hmm</think>ok", ["--mode", "think-high", "--prompt", "Q"],
                              tty=True, env_no_color=True)
    assert rc == 0 and out.getvalue() == "[reasoning]\nhmm\n[answer]\nok\n"


@pytest.mark.parametrize("extra", [["--mode", "think-high"], ["--system", "S"]])
def test_generate_mode_and_system_need_chat(capsys, monkeypatch, extra):
    monkeypatch.setattr(cli, "_load_model", _no_model)
    err = _usage_error(capsys, ["generate", "--prompt", "x", *extra])
    assert "only valid with --chat" in err
    err = _usage_error(capsys, ["generate", "--prompt", "x", "--chat", "--mode", "think"])
    assert "invalid choice: 'think'" in err


def test_generate_chat_modes_match_dsv4_chat():
    from dsv4.chat import MODES

    action = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices["generate"]._actions
                  if a.dest == "mode")
    assert tuple(action.choices) == tuple(MODES)


@pytest.mark.slow
@pytest.mark.skipif(not _model_importable(), reason="dsv4.model (Model) cannot be imported yet")
def test_end_to_end_tiny_chat(capsys):
    """The real `dsv4 generate --model tiny --chat --mode think-max` runs and reports its prompt."""
    from dsv4.chat import encode_chat

    argv = ["generate", "--model", "tiny", "--chat", "--mode", "think-max", "--system", "S",
            "--prompt", FIB, "--max-new-tokens", "3", "--device", "cpu", "--temperature", "1.0",
            "--seed", "1"]
    assert cli.main(argv) == 0
    cap = capsys.readouterr()
    m = STATS_RE.match(cap.err.strip().splitlines()[-1])
    assert m, cap.err
    want = encode_chat(load_tokenizer(), [{"role": "system", "content": "S"},
                                          {"role": "user", "content": FIB}], mode="think-max")
    assert int(m.group(1)) == len(want) and int(m.group(2)) <= 3
    assert not cap.out.startswith(FIB) and cap.out.endswith("\n")
    assert cli.main(argv) == 0 and capsys.readouterr().out == cap.out  # seeded: reproducible


def test_generate_value_error_is_one_line(capsys, monkeypatch):
    """A ValueError from the generation loop (on a GPU e.g. an engine cache that does not fit;
    here the loop's own check, reached by bypassing the parser's --stop check) is a one-line
    error and exit status 1, not a traceback."""
    monkeypatch.setattr(cli, "_stop_text", lambda s: s)
    assert cli.main(["generate", "--model", "tiny", "--prompt", FIB, "--max-new-tokens", "2",
                     "--stop", ""]) == 1
    err = capsys.readouterr().err
    assert "dsv4 generate: error: stop_strings must be non-empty strings" in err
    assert "Traceback" not in err
