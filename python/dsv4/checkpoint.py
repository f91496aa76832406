"""Checkpoint I/O with the official tensor names (architecture.md §12).

This module reads and writes bf16/fp32 safetensors checkpoints: one ``model.safetensors`` or
shards listed in ``model.safetensors.index.json``. Tensors are read one at a time with
``safetensors.safe_open`` and copied straight into parameters created on the target device.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig

__all__ = ["CheckpointError", "checkpoint_files", "load_checkpoint", "save_checkpoint"]


class CheckpointError(RuntimeError):
    """A checkpoint that does not match the model (names, shapes) or cannot be read."""


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of checkpoint directory ``path`` (index-listed shards or all
    ``*.safetensors`` except ``golden.safetensors``). Raises CheckpointError when none exist."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, s) for s in shards]
    files = sorted(f for f in os.listdir(path)
                   if f.endswith(".safetensors") and f != "golden.safetensors")
    if not files:
        raise CheckpointError(f"no *.safetensors weights found in {path}")
    return [os.path.join(path, f) for f in files]


def load_checkpoint(model_cls, path, device="cpu", dtype=torch.bfloat16, **config_overrides):
    """Build ``model_cls(config)`` from ``path/config.json`` and load its weights.

    The model is created on the meta device and materialised on ``device``; compute weights are
    held in ``dtype``, fp32-only parameters in fp32. Raises :class:`~dsv4.config.ConfigError`
    for an unusable config and :class:`CheckpointError` listing every missing, unexpected or
    mis-shaped tensor (nothing is partially loaded silently).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory not found: {path}")
    config = ModelConfig.from_json(os.path.join(path, "config.json"), **config_overrides)
    with torch.device("meta"):
        model = model_cls(config)
    model.to_empty(device=device)
    model.to(dtype=dtype)
    targets = dict(model.named_parameters())
    targets.update(model.named_buffers())
    seen, unexpected, bad_shape = set(), [], []
    for file in checkpoint_files(path):
        try:
            f = safe_open(file, framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read {file}: {e}") from e
        with f:
            for name in f.keys():
                if name not in targets:
                    unexpected.append(name)
                    continue
                t = f.get_tensor(name)
                dst = targets[name]
                if tuple(t.shape) != tuple(dst.shape):
                    bad_shape.append(f"{name}: file {tuple(t.shape)} vs model {tuple(dst.shape)}")
                    continue
                with torch.no_grad():
                    dst.copy_(t.to(device))
                seen.add(name)
    missing = sorted(set(targets) - seen)
    if missing or unexpected or bad_shape:
        msg = [f"checkpoint {path} does not match the model built from its config.json:"]
        for title, items in (("missing", missing), ("unexpected", sorted(unexpected)),
                             ("wrong shape", bad_shape)):
            if items:
                shown = ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
                msg.append(f"  {title}: {shown}")
        raise CheckpointError("\n".join(msg))
    return model


def save_checkpoint(model, path) -> None:
    """Write ``config.json`` and ``model.safetensors`` (official names, tensors as held)."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    model.config.to_json(os.path.join(path, "config.json"))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
