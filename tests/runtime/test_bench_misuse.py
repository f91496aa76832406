"""``dsv4 bench`` with bad options: a usage error naming the option (exit 2) or a one-line
error (exit 1), on any machine and before anything is built or timed; never a traceback, and
never after a whole GPU run (an unwritable --json / --plot)."""

from __future__ import annotations

import pytest

from dsv4 import cli


@pytest.mark.parametrize("argv, option", [
    (["--layers", "0"], "--layers"), (["--layers", "-1"], "--layers"),
    (["--experts", "-3"], "--experts"), (["--steps", "0"], "--steps"),
    (["--chunk", "0"], "--chunk"), (["--steps", "x"], "--steps"),
])
def test_bad_numbers_are_usage_errors(argv, option, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: expected an integer >=" in err and "Traceback" not in err


@pytest.mark.parametrize("seed", ["-1", str(2 ** 64), "x"])
def test_a_seed_outside_the_generators_range_is_a_usage_error(seed, capsys):
    """--seed 2**64 passed, then torch.manual_seed failed after the GPU check with an
    "Overflow when unpacking long long" that named no option."""
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--seed", seed])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --seed:" in err and "Traceback" not in err


def test_more_layers_than_the_model_has_are_refused(capsys):
    """--layers 2147483647 built a 2**31-entry config (a MemoryError traceback or a hang)."""
    assert cli.main(["bench", "--model", "tiny", "--layers", "2147483647"]) == 1
    err = capsys.readouterr().err
    assert "dsv4 bench: error: argument --layers: tiny has" in err and "got 2147483647" in err


@pytest.mark.parametrize("argv, message", [
    (["--json", "/tmp"], "argument --json: '/tmp' is a directory"),
    (["--plot", "/tmp"], "argument --plot: '/tmp' is a directory"),
    (["--plot", "/tmp/out.xyz"], "argument --plot: name a .png file"),
    (["--mode", "1m", "--layers", "2", "--context", "64K"], "--context: e2e options"),
    (["--mode", "1m", "--layers", "2", "--batch", "1,2", "--compare", "hf"],
     "--batch, --compare: e2e options"),
    (["--mode", "1m", "--layers", "2", "--plot", "/tmp/x.png"], "--plot: e2e options"),
])
def test_outputs_and_options_the_run_would_fail_on_or_ignore(argv, message, capsys):
    """A directory as --json (or a plot format matplotlib lacks) failed only after the whole
    run, losing its rows; --mode 1m ignored the e2e options without a word."""
    assert cli.main(["bench", "--model", "tiny", *argv]) == 1
    err = capsys.readouterr().err
    assert f"dsv4 bench: error: {message}" in err and "CUDA" not in err, err


def test_an_unknown_model_is_named_before_the_gpu_check(capsys):
    assert cli.main(["bench", "--model", "/nonexistent/ckpt"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dsv4 bench: error: ") and "/nonexistent/ckpt" in err
    assert "CUDA" not in err


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_an_unwritable_output_is_refused_before_the_run(option, capsys):
    assert cli.main(["bench", "--model", "tiny", option, "/nonexistent/dir/out"]) == 1
    err = capsys.readouterr().err
    assert f"dsv4 bench: error: argument {option}: cannot write '/nonexistent/dir/out'" in err


def test_valid_options_on_a_cpu_machine_say_a_gpu_is_needed(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the bench would run")
    assert cli.main(["bench", "--model", "tiny", "--quick"]) == 1
    assert "dsv4 bench: error: dsv4 bench needs a CUDA GPU" in capsys.readouterr().err
