"""``dsv4 bench`` with bad options: a usage error naming the option (exit 2) or a one-line
error (exit 1), on any machine and before anything is built or timed; never a traceback, and
never after a whole GPU run (an unwritable --json / --plot)."""

from __future__ import annotations

import pytest

from dsv4 import cli


@pytest.mark.parametrize("argv, option", [
    (["--layers", "0"], "--layers"), (["--layers", "-1"], "--layers"),
    (["--experts", "-3"], "--experts"), (["--steps", "0"], "--steps"),
    (["--chunk", "0"], "--chunk"), (["--seed", "-1"], "--seed"), (["--steps", "x"], "--steps"),
])
def test_bad_numbers_are_usage_errors(argv, option, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: expected an integer >=" in err and "Traceback" not in err


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
