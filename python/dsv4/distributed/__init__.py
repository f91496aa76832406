"""Expert parallelism on ``torch.distributed`` (issue 12; kernels.md §4.6, architecture.md §9,
§12.4): a model too large for one GPU runs across N processes, each holding 1/N of the routed
experts, with the attention, shared experts, embedding and head replicated and each process
running its own sequences (data-parallel attention). Tokens reach their experts' process and
come back with ``all_to_all_single``; the same code runs NCCL on GPUs and gloo on CPUs.

Python API (every rank runs the same program, e.g. under ``torchrun --nproc-per-node N``)::

    import torch, dsv4.distributed as ep
    group = ep.init()                                       # torchrun env: NCCL or gloo
    model = ep.from_pretrained(path, group)                 # this rank's experts only
    #   or: model = ep.expert_parallel(dsv4.Model(config), group)   (same seed on every rank)
    with torch.no_grad():
        logits = model(my_ids, cache=my_cache)              # each rank its own sequences
    ep.serve(model)                                         # no work left: serve the others

A rank with no work in one step (but maybe in the next) calls ``ep.serve_step(model)``.

The runtime engine does this itself for a model where :func:`is_expert_parallel` holds:
``dsv4.runtime.Engine(model).generate(my_prompts)`` on every rank (each its own prompts, zero
included) keeps the ranks in step, with CUDA graphs off (see ``dsv4.runtime.engine``).

The model stays a :class:`dsv4.Model`: ``dsv4.generate.generate`` and any driver that calls
its forward work unchanged, as long as every rank calls the MoE layers in the same order and
a rank without work is in :func:`serve`.

Command line: ``torchrun --nproc-per-node N -m dsv4 generate ...`` (:mod:`.launch`).
"""

from .group import ExpertParallelGroup, init, torchrun_world_size
from .loading import RankFiles, from_pretrained, is_rank_directory
from .model import (check_same_model, convert_moe_layers, expert_parallel, group_of,
                    is_expert_parallel, serve, serve_step, then_serve)
from .moe import IDLE, ExpertParallelMoE, ExpertSlice, serve_once

__all__ = ["ExpertParallelGroup", "init", "torchrun_world_size", "from_pretrained", "RankFiles",
           "is_rank_directory", "expert_parallel", "convert_moe_layers", "check_same_model",
           "serve", "serve_step", "group_of", "is_expert_parallel", "then_serve",
           "ExpertParallelMoE", "ExpertSlice", "serve_once",
           "IDLE"]
