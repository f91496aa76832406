"""The backend switch on first use: a bad DSV4_BACKEND is a one-line notice, never an import
error; ``--backend cuda`` where it cannot run is a clear usage error (issue 13 item 6)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import dsv4
from dsv4 import cli
from dsv4.ops import backend

PYTHONPATH = os.path.dirname(os.path.dirname(os.path.abspath(dsv4.__file__)))


def _run(code: str, env_backend: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=PYTHONPATH + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("DSV4_BACKEND", None)
    if env_backend is not None:
        env["DSV4_BACKEND"] = env_backend
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)


def test_unknown_dsv4_backend_is_a_one_line_notice_not_an_import_error():
    p = _run("import dsv4; print(dsv4.get_backend())", "bogus")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "cuda"
    lines = p.stderr.strip().splitlines()
    assert lines == ["dsv4: DSV4_BACKEND='bogus' is not one of cuda, reference; using 'cuda' "
                     "(the default)"], p.stderr


def test_help_works_with_a_bad_dsv4_backend():
    p = _run("import sys; from dsv4.cli import main; sys.argv = ['dsv4', '--help']; main()",
             "bogus")
    assert p.returncode == 0, p.stderr
    assert "usage: dsv4" in p.stdout and "generate" in p.stdout


def test_valid_values_are_case_insensitive_and_silent():
    p = _run("import dsv4; print(dsv4.get_backend())", " Reference ")
    assert (p.returncode, p.stdout.strip(), p.stderr.strip()) == (0, "reference", "")


def test_check_backend():
    backend.check_backend("reference", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend must be one of cuda, reference; got 'x'"):
        backend.check_backend("x", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend 'cuda' runs the dsv4 CUDA kernels on CUDA "
                                         "tensors, but .*use backend 'reference'"):
        backend.check_backend("cuda", torch.device("cpu"))


def test_check_backend_without_compiled_kernels(monkeypatch):
    from dsv4.ops import _ext

    monkeypatch.setattr(_ext, "info", lambda: {"cuda_compiled_ops": [],
                                               "import_error": "ImportError: no _C"})
    with pytest.raises(ValueError, match=r"no compiled CUDA kernels \(ImportError: no _C"):
        backend.check_backend("cuda", torch.device("cuda"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_generate_backend_cuda_without_a_gpu_is_a_usage_error(capsys):
    before = backend.get_backend()
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--prompt", "x", "--backend", "cuda"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --backend: backend 'cuda'" in err
    assert "no CUDA device is available" in err and "use backend 'reference'" in err
    assert backend.get_backend() == before      # nothing was changed


def test_generate_backend_cuda_on_cpu_device_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--prompt", "x", "--backend", "cuda", "--device", "cpu"])
    assert "argument --backend" in capsys.readouterr().err
