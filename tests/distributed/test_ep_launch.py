"""``torchrun --nproc-per-node N -m dsv4 generate ...``: the command line across processes.

The forked test sets the environment torchrun would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) and calls ``dsv4.cli.main`` in each rank: rank 0 prints exactly what the
single-process command prints, the other ranks print nothing and serve rank 0's experts. The
slow test runs the real ``torchrun -m dsv4``.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys

import pytest
import torch

import dsv4
from dsv4 import cli
from dsv4.distributed import launch

from _ep_harness import free_port, run_ranks

FIB = "def fibonacci(n):"
ARGV = ["generate", "--model", "tiny", "--prompt", FIB, "--max-new-tokens", "3", "--device",
        "cpu"]


def _cli_rank(rank, world, port, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(ARGV)
    with open(os.path.join(out_dir, f"rank{rank}.out"), "w") as f:
        f.write(out.getvalue())
    with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
        f.write(err.getvalue())
    assert rc == 0, err.getvalue()
    assert not torch.distributed.is_initialized()        # the command tears the group down


def test_generate_across_two_processes_prints_the_single_process_text(tmp_path, capsys):
    assert cli.main(ARGV) == 0
    single = capsys.readouterr()
    run_ranks(2, _cli_rank, free_port(), str(tmp_path), init=False)
    assert (tmp_path / "rank0.out").read_text() == single.out
    assert single.out.startswith(FIB)
    assert (tmp_path / "rank1.out").read_text() == ""
    err0 = (tmp_path / "rank0.err").read_text().splitlines()
    assert err0[0] == cli.TINY_NOTICE and err0[-1].startswith("[prompt tokens: ")
    assert "new tokens: 3" in err0[-1]
    assert (tmp_path / "rank1.err").read_text() == ""


def test_commands_that_do_not_run_across_processes_are_usage_errors(capsys):
    parser = cli.build_parser()
    args = parser.parse_args(["info"])
    with pytest.raises(SystemExit) as e:
        launch.run(args, parser)
    assert e.value.code == 2
    assert "dsv4 info does not run across processes" in capsys.readouterr().err
    assert not launch.active()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="no torchrun on PATH")
def test_real_torchrun(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    pkg_root = os.path.dirname(list(dsv4.__path__)[0])
    env["PYTHONPATH"] = pkg_root + os.pathsep + env.get("PYTHONPATH", "")
    single = subprocess.run([sys.executable, "-m", "dsv4", *ARGV], capture_output=True,
                            text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr
    proc = subprocess.run(["torchrun", "--nproc-per-node", "2", "--master-port",
                           str(free_port()), "-m", "dsv4", *ARGV],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == single.stdout and proc.stdout.startswith(FIB)
