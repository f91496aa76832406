"""Loading an expert-parallel model: each rank reads the replicated tensors and ITS routed
experts only, from the release shards or from ``dsv4 convert --model-parallel`` rank files.

* Release / HF-style checkpoints (``model.safetensors.index.json`` + shards, or one file): the
  ordinary loader (:func:`dsv4.checkpoint.load_checkpoint`: header checks, FP8/FP4 handling,
  ``weights="native"``) builds the model on the meta device, the MoE layers keep this rank's
  experts, and the other experts' tensors are skipped (never read).
* ``model{r}-mp{MP}.safetensors`` rank files (architecture.md §12.4): :class:`RankFiles`
  presents them to the same loader as one checkpoint: a routed expert comes from the file that
  holds it (whatever MP is, as long as it covers the experts), a dim-split tensor (embed, head,
  wq_b, wo_a, attn_sink, weights_proj, wo_b) is the concatenation of the ranks' slices (the
  attention runs replicated here, not tensor-parallel), a replicated tensor is read from this
  rank's own file when there is one.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..checkpoint import CheckpointError, load_checkpoint
from ..checkpoint_io import SafetensorsFile
from ..convert import _RANK_FILE, ConvertError, _rank_files, plan_rank_tensors, split_rule
from .group import ExpertParallelGroup, init
from .model import check_same_model, convert_moe_layers

__all__ = ["from_pretrained", "RankFiles", "is_rank_directory"]


def is_rank_directory(path: str) -> bool:
    """Whether ``path`` holds ``model{r}-mp{MP}.safetensors`` rank files (and no index or
    ``model.safetensors``, which the ordinary layout would use). An incomplete set counts
    (:class:`RankFiles` then names what is missing)."""
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "model.safetensors")) \
            or os.path.exists(os.path.join(path, "model.safetensors.index.json")):
        return False
    return any(_RANK_FILE.match(f) for f in os.listdir(path))


class RankFiles:
    """The rank files of a ``dsv4 convert --model-parallel MP`` directory as ONE tensor source
    with the :class:`~dsv4.checkpoint_io.SafetensorsFile` interface (``path``, ``tensors``,
    ``read``), for :func:`dsv4.checkpoint.load_checkpoint`'s ``readers``.

    Args:
        path: the directory.
        prefer_rank: read replicated tensors from rank file ``prefer_rank % MP``.

    Raises CheckpointError for missing rank files, a routed expert on two ranks, a split or
    replicated tensor missing on some rank, or split slices whose dtypes or other dims differ.
    Headers only are read here; ``read(name)`` reads (and for split tensors concatenates) on
    demand. Use as a context manager (closes the files).
    """

    def __init__(self, path: str, prefer_rank: int = 0):
        try:
            mp, paths = _rank_files(path)
        except ConvertError as e:
            raise CheckpointError(str(e)) from None
        self.path = os.path.join(path, f"model{{rank}}-mp{mp}.safetensors")
        self._files = []
        try:
            for p in paths:
                self._files.append(SafetensorsFile(p, CheckpointError))
        except BaseException:
            self.close()
            raise
        prefer = prefer_rank % mp
        headers = [{n: (d, shape) for n, (d, shape, _) in f.tensors.items()} for f in self._files]
        plan, problems = plan_rank_tensors(headers)
        if problems:
            self.close()
            raise CheckpointError(f"inconsistent rank files in {path}:\n  "
                                  + "\n  ".join(problems[:20]))
        self.tensors: dict[str, tuple[str, tuple[int, ...], None]] = {
            n: (t.dtype, tuple(t.shape), None) for n, t in plan.items()}
        self._how: dict[str, tuple[str, int, list[int]]] = {}   # kind, dim, ranks to read
        for n, t in plan.items():
            if t.kind == "split":
                self._how[n] = ("split", t.dim, list(range(mp)))
            else:      # an expert's one holder; a replica from prefer_rank's file
                self._how[n] = ("one", -1, [prefer if t.kind == "replicate" else t.holders[0]])

    def keys(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str) -> torch.Tensor:
        kind, dim, ranks = self._how[name]
        if kind == "one":
            return self._files[ranks[0]].read(name)
        return torch.cat([self._files[r].read(name) for r in ranks], dim=dim)

    def close(self) -> None:
        for f in self._files:
            f.close()

    def __enter__(self) -> "RankFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def from_pretrained(path: str | os.PathLike, group: Optional[ExpertParallelGroup] = None,
                    device: Optional[str | torch.device] = None,
                    dtype: torch.dtype = torch.bfloat16, weights: str = "dequant",
                    num_layers: Optional[int] = None, progress: bool = True,
                    readers: Optional[list] = None, **config_overrides):
    """Load a :class:`dsv4.Model` whose MoE layers hold this rank's experts only.

    Args:
        path: a checkpoint directory: the release / HF layout (index + shards, or
            ``model.safetensors``) or the rank files of ``dsv4 convert --model-parallel MP``
            (any MP whose files hold every expert; replicated tensors are taken from this rank's
            file, split ones concatenated).
        group: the expert-parallel group (None: :func:`dsv4.distributed.init`).
        device: None: ``group.device``.
        dtype, weights, num_layers, config_overrides: as :meth:`dsv4.Model.from_pretrained`
            (``weights="native"`` keeps FP8/FP4 bytes).
        progress: a tqdm bar on rank 0.
        readers: tensor sources to read instead of ``path``'s files (SafetensorsFile-like, see
            :func:`dsv4.checkpoint.load_checkpoint`; e.g. a synthetic release-format model,
            bench/bench_ep.py); ``path`` still supplies ``config.json``.

    Returns the model on ``device``, checked to be the same on every rank (collective).

    Raises:
        ValueError: the world size does not divide ``n_routed_experts``, bad arguments.
        ConfigError, CheckpointError: as the single-process loader (missing, mis-shaped or
            corrupt tensors are found from the headers before anything is read).
        RuntimeError: the ranks loaded different models.
    """
    from ..model import Model

    group = init() if group is None else group
    device = group.device if device is None else torch.device(device)
    path = os.fspath(path)

    local: list[range] = []

    def build(config):   # called by the loader (on the meta device) before any tensor is read
        local.append(group.expert_range(config.n_routed_experts))
        return convert_moe_layers(Model(config), group)

    def foreign_expert(name: str) -> bool:   # other ranks' experts: not read, not "unexpected"
        kind, e = split_rule(name)
        return kind == "expert" and e not in local[-1]

    kwargs = dict(device=device, dtype=dtype, weights=weights, num_layers=num_layers,
                  progress=progress and group.rank == 0, skip_tensor=foreign_expert)
    if readers is not None:
        model = load_checkpoint(build, path, readers=readers, **kwargs, **config_overrides)
    elif is_rank_directory(path):
        with RankFiles(path, prefer_rank=group.rank) as files:
            model = load_checkpoint(build, path, readers=[files], **kwargs, **config_overrides)
    else:
        model = load_checkpoint(build, path, **kwargs, **config_overrides)
    check_same_model(model, group)
    return model
