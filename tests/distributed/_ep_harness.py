"""Run a function in N processes joined in a torch.distributed group (the expert-parallel tests).

CPU tests fork the processes (no re-import, ~0.1 s each) and join them in a gloo group through a
file store; a failing rank's exception (with its traceback) is raised in the test and the other
ranks are stopped. CUDA tests use ``spawn`` (CUDA cannot be used after a fork) and NCCL.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, store, backend, init, fn, args):
    if backend == "gloo":
        torch.set_num_threads(1)
    if not init:
        fn(rank, world, *args)
        return
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, fn, *args, backend: str = "gloo", init: bool = True,
              timeout: float = TIMEOUT_S) -> None:
    """Call ``fn(rank, world, *args)`` in ``world`` processes (in a group unless ``init`` is
    False); raise the first failure; stop every process after ``timeout`` seconds."""
    fd, store = tempfile.mkstemp(prefix="dsv4-ep-store-")
    os.close(fd)
    os.remove(store)            # the file store wants a path that does not exist yet
    method = "fork" if backend == "gloo" else "spawn"
    ctx = mp.start_processes(_entry, args=(world, store, backend, init, fn, args), nprocs=world,
                             join=False, start_method=method)
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=0.5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {world} ranks did not finish within {timeout:.0f} s "
                                   "(a collective out of step?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
        if os.path.exists(store):
            os.remove(store)


def run_dsv4_cli(argv: list[str], nproc: int = 0, timeout: int = 900):
    """``python -m dsv4 *argv`` (``nproc`` 0) or ``torchrun --nproc-per-node nproc -m dsv4
    *argv`` with this checkout's package first on PYTHONPATH; the CompletedProcess (text)."""
    import subprocess
    import sys

    import dsv4
    env = dict(os.environ)
    pkg_root = os.path.dirname(list(dsv4.__path__)[0])
    env["PYTHONPATH"] = pkg_root + os.pathsep + env.get("PYTHONPATH", "")
    launcher = [sys.executable] if nproc == 0 else \
        ["torchrun", "--nproc-per-node", str(nproc), "--master-port", str(free_port())]
    return subprocess.run([*launcher, "-m", "dsv4", *argv], capture_output=True, text=True,
                          env=env, timeout=timeout)
