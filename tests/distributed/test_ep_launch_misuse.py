"""``torchrun --nproc-per-node 3 -m dsv4 generate --model tiny``: 3 does not divide the tiny
model's 8 experts. Every rank ends with the command's one-line ``cannot load`` error naming
the world sizes that work (exit status 1), before building the model; no traceback, no rank
left waiting in a collective."""

from __future__ import annotations

import contextlib
import io
import os

import torch

from dsv4 import cli

from _ep_harness import free_port, run_ranks

ARGV = ["generate", "--model", "tiny", "--prompt", "x", "--max-new-tokens", "2", "--device",
        "cpu"]


def _rank(rank, world, port, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = cli.main(ARGV)
    with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
        f.write(f"rc={rc}\n" + err.getvalue())
    assert not torch.distributed.is_initialized()


def test_world_size_that_does_not_divide_the_experts_is_a_one_line_error(tmp_path):
    run_ranks(3, _rank, free_port(), str(tmp_path), init=False)
    for r in range(3):
        err = (tmp_path / f"rank{r}.err").read_text()
        assert err.startswith("rc=1\n"), err
        assert "Traceback" not in err
        assert ("dsv4 generate: error: cannot load 'tiny': expert parallelism over 3 processes "
                "needs a world size that divides n_routed_experts (8); use one of [1, 2, 4, 8]"
                in err), err
