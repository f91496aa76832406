"""The process group of an expert-parallel run: which rank this process is, how many there are,
and the device its tensors (and the all-to-all buffers) live on.

``init()`` joins the group that ``torchrun`` describes in the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): NCCL with one GPU per process
(``cuda:LOCAL_RANK``) when CUDA is available, gloo on the CPU otherwise. Code that set up
``torch.distributed`` itself describes its group with :meth:`ExpertParallelGroup.current`.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import os
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["ExpertParallelGroup", "init", "torchrun_world_size"]

#: How long a collective may wait for its peers (model loading on the other ranks included).
DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)


def torchrun_world_size() -> int:
    """``WORLD_SIZE`` of the environment (``torchrun`` sets it), 1 when unset or not an int."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


@dataclasses.dataclass(frozen=True)
class ExpertParallelGroup:
    """This process's place in an expert-parallel group.

    Attributes:
        rank: this process's rank in ``[0, world_size)``.
        world_size: number of processes; rank r holds routed experts
            ``[r·E/world_size, (r+1)·E/world_size)`` of every MoE layer (the official
            convert.py split, architecture.md §12.4).
        device: where this rank's model, activations and exchange buffers live (a CUDA device
            for NCCL, the CPU for gloo).
        process_group: the ``torch.distributed`` group (None: the default group).
    """

    rank: int
    world_size: int
    device: torch.device
    process_group: Optional[object] = None

    def __post_init__(self):
        if isinstance(self.world_size, bool) or not isinstance(self.world_size, int) \
                or self.world_size < 1:
            raise ValueError(f"world_size must be an integer >= 1, got {self.world_size!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) \
                or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be an integer in [0, {self.world_size}), got "
                             f"{self.rank!r}")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be a torch.device or a device string ('cpu', "
                             f"'cuda:0', ...), got {self.device!r}") from None
        if device.type == "cuda" and device.index is None:   # tensors report their index
            device = torch.device("cuda", torch.cuda.current_device())
        object.__setattr__(self, "device", device)

    @classmethod
    def current(cls, device: Optional[torch.device | str] = None,
                process_group: Optional[object] = None) -> "ExpertParallelGroup":
        """The group of an initialised ``torch.distributed`` (``process_group`` or the default).

        ``device`` None: ``cuda:<current device>`` for an NCCL group, else the CPU.
        Raises RuntimeError when ``torch.distributed`` is not initialised.
        """
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("torch.distributed is not initialised: call "
                               "dsv4.distributed.init() (under torchrun) or "
                               "torch.distributed.init_process_group first")
        if device is None:
            nccl = dist.get_backend(process_group) == "nccl"
            device = (torch.device("cuda", torch.cuda.current_device()) if nccl
                      else torch.device("cpu"))
        return cls(dist.get_rank(process_group), dist.get_world_size(process_group),
                   torch.device(device), process_group)

    def expert_range(self, n_experts: int) -> range:
        """The global indices of the routed experts this rank holds.

        Raises ValueError unless ``world_size`` divides ``n_experts`` (every rank holds the
        same number of experts, as in the official layout).
        """
        if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 0:
            raise ValueError(f"n_experts must be an integer >= 0, got {n_experts!r}")
        if n_experts % self.world_size:
            raise ValueError(
                f"expert parallelism over {self.world_size} processes needs a world size that "
                f"divides n_routed_experts ({n_experts}); use one of "
                f"{[d for d in range(1, n_experts + 1) if n_experts % d == 0]}")
        n = n_experts // self.world_size
        return range(self.rank * n, (self.rank + 1) * n)


def init(device: Optional[torch.device | str] = None, backend: Optional[str] = None,
         timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> ExpertParallelGroup:
    """Join the expert-parallel process group (idempotent) and return this rank's place in it.

    Args:
        device: this rank's device. None: ``cuda:LOCAL_RANK`` when CUDA is available, else the
            CPU. A CUDA device without an index gets ``LOCAL_RANK``.
        backend: ``"nccl"`` (CUDA devices) or ``"gloo"`` (CPU); None picks by device.
        timeout: how long a collective waits for its peers.

    The group comes from the ``torchrun`` environment (``env://``: RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT); a process without them is a group of one (rank 0 of 1, a local
    file store). When ``torch.distributed`` is already initialised, that group is used.

    Raises:
        RuntimeError: torch.distributed is unavailable in this torch build.
        ValueError: a CUDA device without CUDA, or a backend that does not fit the device.
    """
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    try:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank < 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"the environment variable LOCAL_RANK must be an integer >= 0 (torchrun "
                         f"sets it), got {os.environ['LOCAL_RANK']!r}") from None
    if device is None:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() \
            else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    want = "nccl" if device.type == "cuda" else "gloo"
    backend = backend or want
    if backend not in ("nccl", "gloo") or (backend == "nccl" and device.type != "cuda"):
        raise ValueError(f"backend {backend!r} does not fit device {device}: use 'nccl' with "
                         "CUDA devices or 'gloo' with the CPU")
    if dist.is_initialized():
        return ExpertParallelGroup.current(device)
    if "MASTER_ADDR" in os.environ:
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=timeout, **kwargs)
    else:   # a single process outside torchrun: a group of one
        import tempfile
        store = tempfile.NamedTemporaryFile(prefix="dsv4-ep-", delete=False)
        store.close()
        atexit.register(_remove_file, store.name)   # the store lives as long as the group
        dist.init_process_group(backend, init_method=f"file://{store.name}", rank=0,
                                world_size=1, timeout=timeout)
    return ExpertParallelGroup.current(device)


def _remove_file(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
