"""The ``dsv4`` command line under ``torchrun``:
``torchrun --nproc-per-node N -m dsv4 generate ...`` runs the model with expert parallelism over
N processes (one GPU each with NCCL; the CPU with gloo when CUDA is unavailable or
``--device cpu``).

How a command runs (``cli.main`` hands it here when ``WORLD_SIZE > 1``):

* every rank joins the group (:func:`dsv4.distributed.init`) and runs the same subcommand with
  the same arguments; the command's model loading (``cli._load_model``) is redirected to
  :func:`load_model`: ``--model tiny`` is built with the usual seed on every rank and keeps this
  rank's experts, a checkpoint directory is read with :func:`dsv4.distributed.from_pretrained`
  (this rank's experts only);
* ``generate``: rank 0 generates the prompt and prints; the other ranks load the model,
  generate nothing (``max_new_tokens`` 0) and serve rank 0's MoE exchanges (on CUDA the loop is
  ``dsv4.runtime.generate``, whose engine runs eagerly on an expert-parallel model and serves
  until every rank is done; on the CPU the reference loop);
* ``bench`` (the runtime's command, when present) and any other command listed in
  :data:`COMMANDS`: every rank runs it on its own data (data-parallel), rank 0 prints;
* at the end every rank calls :func:`dsv4.distributed.serve` until all ranks are done, so a
  rank that finishes early keeps serving the others' experts.

Output of ranks other than 0 is discarded unless the command fails (then its stderr is
printed, prefixed with the rank).
"""

from __future__ import annotations

import contextlib
import io
import sys
from typing import Any, Optional

__all__ = ["COMMANDS", "runs_distributed", "active", "run", "load_model"]

#: Subcommands that run across processes.
COMMANDS = ("generate", "bench")


class _State:
    group = None
    model = None
    plain = False    # True while load_model builds the single-process model it then shards


_state = _State()


def runs_distributed(args: Any) -> bool:
    """Whether ``cli.main`` should hand the parsed ``args`` to :func:`run` (torchrun started
    this process with WORLD_SIZE > 1)."""
    from .group import torchrun_world_size
    return torchrun_world_size() > 1


def active() -> bool:
    """Whether a distributed command is running in this process (``cli._load_model`` then
    loads the expert-parallel model through :func:`load_model`)."""
    return _state.group is not None and not _state.plain


def load_model(name: str, device: Any, dtype: Any, quant_sim: Optional[bool] = None):
    """``cli._load_model`` of a distributed command: the same model, expert-parallel.

    ``tiny``: the single-process command's seeded model (built on the CPU), then sharded and
    moved to this rank's device; a checkpoint directory: :func:`dsv4.distributed.from_pretrained`
    (release shards or ``dsv4 convert`` rank files; this rank's experts only). ``device`` is
    the command's device; its type must match the group's (the index is this rank's).
    """
    import torch

    from .loading import from_pretrained
    from .model import expert_parallel

    group = _state.group
    if torch.device(device).type != group.device.type:
        raise ValueError(f"the command asked for {device} but the process group runs on "
                         f"{group.device}")
    _check_world_size(name, group, quant_sim)
    if name == "tiny":
        from .. import cli
        _state.plain = True
        try:
            model = cli._load_model(name, torch.device("cpu"), dtype, quant_sim)
        finally:
            _state.plain = False
        model = expert_parallel(model, group)
    else:
        over = {} if quant_sim is None else {"quant_sim": quant_sim}
        model = from_pretrained(name, group, dtype=dtype, **over)
    _state.model = model
    return model


def _check_world_size(name: str, group: Any, quant_sim: Optional[bool]) -> None:
    """Raise ConfigError (a one-line ``cannot load`` error of the command, the same on every
    rank) before anything is built or read when the world size does not divide the model's
    routed experts; a config that cannot be read is left to the loader to report."""
    from ..config import ConfigError, ModelConfig
    try:
        over = {} if quant_sim is None else {"quant_sim": quant_sim}
        cfg = ModelConfig.tiny(**over) if name == "tiny" else ModelConfig.from_json(name)
    except (ConfigError, OSError, ValueError):
        return
    try:
        group.expert_range(cfg.n_routed_experts)
    except ValueError as e:
        raise ConfigError(str(e)) from None


@contextlib.contextmanager
def _quiet(rank: int):
    """Discard stdout; keep stderr in a buffer, printed (prefixed) if the command fails."""
    out, err = io.StringIO(), io.StringIO()
    ok = False
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield lambda: err.getvalue()
        ok = True
    finally:
        if not ok and err.getvalue():
            for line in err.getvalue().splitlines():
                print(f"[rank {rank}] {line}", file=sys.stderr)


def run(args: Any, parser: Any) -> int:
    """Run the parsed ``dsv4`` command ``args`` as one rank of a torchrun job (module docstring).

    Returns the command's exit status on this rank. Usage errors (a command that does not run
    across processes, a device CUDA cannot provide) exit with status 2 through ``parser``.
    """
    import torch
    import torch.distributed as dist

    from .group import init
    from .model import serve

    if args.command not in COMMANDS:
        parser.error(f"dsv4 {args.command} does not run across processes; run it without "
                     f"torchrun (distributed commands: {', '.join(COMMANDS)})")
    name = getattr(args, "device", None)
    try:
        device = torch.device(name) if name else None
    except RuntimeError as e:
        parser.error(f"argument --device: invalid device {name!r} ({e})")
    if device is not None and device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"argument --device: {name!r} requested but CUDA is not available")
    group = init(device)
    _state.group, _state.model = group, None
    quiet = group.rank != 0
    if quiet and args.command == "generate":
        args.max_new_tokens = 0      # rank 0 generates; the others serve its exchanges
    try:
        if quiet:
            with _quiet(group.rank) as captured:
                rc = int(args.func(args, parser))
            if rc != 0:
                for line in captured().splitlines():
                    print(f"[rank {group.rank}] {line}", file=sys.stderr)
        else:
            rc = int(args.func(args, parser))
        if _state.model is None:
            # No expert-parallel model was loaded here: the command failed before loading it
            # (torchrun then stops the other ranks), or it loads its model some other way
            # (then it ran without expert parallelism).
            why = (f"stopped before loading the model (exit {rc})" if rc else
                   "ran without an expert-parallel model (the command did not load it through "
                   "dsv4.cli._load_model / dsv4.distributed.launch.load_model)")
            print(f"dsv4: rank {group.rank} {why}", file=sys.stderr)
            return rc
        with torch.no_grad():
            serve(_state.model)          # until every rank is done
        return rc
    finally:
        _state.group, _state.model = None, None
        if dist.is_initialized():
            dist.destroy_process_group()
