"""A :class:`dsv4.Model` run with expert parallelism: its MoE layers become
:class:`~dsv4.distributed.moe.ExpertParallelMoE` (this rank's experts only), everything else
(embedding, attention, shared experts, head) stays replicated, and each rank runs its own
sequences through the unchanged ``Model.forward`` (data-parallel attention).
"""

from __future__ import annotations

import zlib
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .group import ExpertParallelGroup
from .moe import ExpertParallelMoE, moe_layers, serve_once

__all__ = ["expert_parallel", "convert_moe_layers", "serve", "serve_step", "check_same_model",
           "group_of", "is_expert_parallel", "then_serve"]


def _blocks(model: nn.Module):
    return list(getattr(model, "layers", [])) + list(getattr(model, "mtp", []))


def convert_moe_layers(model: nn.Module, group: ExpertParallelGroup) -> nn.Module:
    """Replace, in place, every block's ``ffn`` MoE by an :class:`ExpertParallelMoE` keeping
    this rank's experts (tag = the block's ``layer_id``) and freeze every parameter (the
    exchange is inference-only). No communication: works on a model built on the meta device
    (the checkpoint loader's first step). Returns ``model``.

    Raises ValueError when the world size does not divide ``n_routed_experts`` (nothing is
    changed then) or when the model is expert-parallel already.
    """
    blocks = _blocks(model)
    for blk in blocks:
        if isinstance(blk.ffn, ExpertParallelMoE):
            raise ValueError("the model's MoE layers are expert-parallel already")
    if blocks:
        group.expert_range(len(blocks[0].ffn.experts))   # check before changing anything
    for blk in blocks:
        blk.ffn = ExpertParallelMoE(blk.ffn, group, tag=blk.layer_id)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _fingerprint(model: nn.Module, group: ExpertParallelGroup) -> int:
    """A 63-bit hash of what every rank must agree on: config, layer tags, dtype, world."""
    moes = moe_layers(model.modules())
    key = repr((getattr(model, "config", None), sorted(moes), str(getattr(model, "dtype", "")),
                group.world_size))
    return zlib.crc32(key.encode()) | (len(moes) << 32)


def check_same_model(model: nn.Module, group: ExpertParallelGroup) -> None:
    """Collective: check that every rank holds the same model (config, MoE layers, dtype).

    Raises RuntimeError on every rank when they differ (an exchange between different models
    would deadlock or mix layers).
    """
    mine = torch.tensor([_fingerprint(model, group)], dtype=torch.int64, device=group.device)
    every = [torch.empty_like(mine) for _ in range(group.world_size)]
    dist.all_gather(every, mine, group=group.process_group)
    values = [int(v) for v in every]
    if len(set(values)) > 1:
        raise RuntimeError("the expert-parallel ranks hold different models (config, layers, "
                           f"dtype or world size differ; fingerprints by rank: {values})")


def expert_parallel(model: nn.Module, group: ExpertParallelGroup) -> nn.Module:
    """Make ``model`` (a :class:`dsv4.Model` with every expert, e.g. built with the same seed on
    every rank) expert-parallel in place: this rank keeps experts ``group.expert_range(E)`` of
    every MoE layer, frees the others, and moves to ``group.device`` if needed. Collective (every
    rank calls it); returns ``model``.

    Each rank then calls ``model(input_ids, cache=...)`` with its own sequences; every rank
    must make its calls in the same order (the MoE layers exchange tokens), and a rank with
    nothing to run calls :func:`serve`. Inference only (parameters are frozen).

    Raises ValueError when the world size does not divide the expert count, RuntimeError when
    the ranks' models differ.
    """
    convert_moe_layers(model, group)
    if getattr(model, "device", group.device) != group.device:
        model.to(group.device)
    check_same_model(model, group)
    return model


def serve(model: nn.Module) -> int:
    """Answer the other ranks' MoE exchanges until every rank is serving at the same moment.

    A rank with no sequences (left) to run calls this: it computes its experts for the tokens
    the others send, layer after layer, step after step. It returns when all ranks are in
    ``serve`` at once: a common point after which the ranks may start new work together, or
    leave. Returns the number of layer exchanges served. Collective.

    Raises ValueError when ``model`` has no expert-parallel MoE layer, RuntimeError when the
    ranks are out of step.
    """
    moes = moe_layers(model.modules())
    if not moes:
        raise ValueError("serve() needs a model made expert-parallel (dsv4.distributed."
                         "expert_parallel / from_pretrained)")
    served = 0
    while serve_once(moes) is not None:
        served += 1
    return served


def serve_step(model: nn.Module) -> bool:
    """Answer the other ranks' MoE exchanges for ONE step, for a rank without work in this step
    (an engine's idle iteration): serves until the last main layer (a ``forward``) or an MTP
    layer (a ``forward_mtp``) was served, so that the rank may run its own work in the next
    step. Returns False when every rank was idle (nothing was exchanged), True otherwise.
    Collective; raises like :func:`serve`.
    """
    moes = moe_layers(model.modules())
    if not moes:
        raise ValueError("serve_step() needs a model made expert-parallel (dsv4.distributed."
                         "expert_parallel / from_pretrained)")
    n_main = len(getattr(model, "layers", []))
    while True:
        tag = serve_once(moes)
        if tag is None:
            return False
        if tag >= n_main - 1:
            return True


def group_of(model: nn.Module) -> Optional[ExpertParallelGroup]:
    """The expert-parallel group of ``model``'s MoE layers, or None for a single-process model."""
    for m in model.modules():
        if isinstance(m, ExpertParallelMoE):
            return m.group
    return None


def is_expert_parallel(model: nn.Module) -> bool:
    """Whether ``model`` has expert-parallel MoE layers (made by :func:`expert_parallel` or
    :func:`~dsv4.distributed.loading.from_pretrained`): its forward is then a collective, and a
    driver must keep every rank in step (:func:`serve_step`, :func:`serve`). Walks the
    modules; a driver that asks per step should ask once and keep the answer. False for
    anything that is not an ``nn.Module``."""
    return isinstance(model, nn.Module) and group_of(model) is not None


def then_serve(model: nn.Module, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, then :func:`serve` until every rank is done, for a driver that
    runs its own work on an expert-parallel ``model`` and may finish before the other ranks
    (``dsv4.runtime.Engine.generate``, ``dsv4.runtime.generate``). Returns ``fn``'s result.

    When ``fn`` raises an Exception, this rank still serves (so that the others' steps, and a
    step this rank left half-way before its next exchange, complete) and then re-raises it; an
    error of that serve is attached to it as a note. A KeyboardInterrupt or SystemExit is
    re-raised at once (the job is being stopped). Collective: every rank calls :func:`serve`
    the same number of times, so every rank must call this (or :func:`serve`) once per call.
    """
    try:
        out = fn(*args, **kwargs)
    except Exception as e:
        try:
            with torch.no_grad():
                serve(model)
        except Exception as e2:
            e.add_note(f"dsv4.distributed: serving the other ranks after this error failed "
                       f"too ({type(e2).__name__}: {e2})")
        raise
    with torch.no_grad():
        serve(model)
    return out
