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


_FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu")
                    if hasattr(torch, n))


class CheckpointError(RuntimeError):
    """A checkpoint that does not match the model (names, shapes) or cannot be read."""


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of checkpoint directory ``path`` (index-listed shards or all
    ``*.safetensors`` except ``golden.safetensors``). Raises CheckpointError when none exist."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a safetensors index with a weight_map: "
                                  f"{e!r}") from None
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
    for a missing or unusable config and :class:`CheckpointError` listing every missing,
    unexpected, mis-shaped or mis-typed tensor (nothing is partially loaded silently), for an
    unreadable shard (naming the file), for ``tid2eid`` entries outside the expert range, and
    for release-format FP8/FP4 checkpoints (``*.scale`` tensors), which this loader does not
    dequantise yet.
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
    seen, unexpected, bad = set(), [], []
    for file in checkpoint_files(path):
        try:
            f = safe_open(file, framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read {file}: {e}") from e
        with f:
            names = list(f.keys())
            scales = [n for n in names if n.endswith(".scale")]
            if scales:
                raise CheckpointError(
                    f"{file} is in the FP8/FP4 release format ({len(scales)} '*.scale' tensors, "
                    f"e.g. {scales[0]}); this version of dsv4 loads bf16/fp32 checkpoints only")
            for name in names:
                if name not in targets:
                    unexpected.append(name)
                    continue
                try:
                    t = f.get_tensor(name)
                except Exception as e:
                    raise CheckpointError(f"cannot read tensor {name} from {file}: {e}") from e
                dst = targets[name]
                seen.add(name)
                if tuple(t.shape) != tuple(dst.shape):
                    bad.append(f"{name}: file {tuple(t.shape)} vs model {tuple(dst.shape)}")
                    continue
                if t.is_floating_point() != dst.is_floating_point() or t.dtype in _FP8_DTYPES:
                    bad.append(f"{name}: file dtype {t.dtype} vs model {dst.dtype}")
                    continue
                with torch.no_grad():
                    dst.copy_(t.to(device))
    missing = sorted(set(targets) - seen)
    if missing or unexpected or bad:
        msg = [f"checkpoint {path} does not match the model built from its config.json:"]
        for title, items in (("missing", missing), ("unexpected", sorted(unexpected)),
                             ("wrong shape or dtype", bad)):
            if items:
                shown = ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
                msg.append(f"  {title}: {shown}")
        raise CheckpointError("\n".join(msg))
    n_exp = config.n_routed_experts
    for name, buf in model.named_buffers():
        if name.endswith("tid2eid") and buf.numel() and (int(buf.min()) < 0 or int(buf.max()) >= n_exp):
            raise CheckpointError(f"{name} holds expert ids outside [0, {n_exp})")
    return model


def save_checkpoint(model, path) -> None:
    """Write ``config.json`` and ``model.safetensors`` (official names, tensors as held)."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    model.config.to_json(os.path.join(path, "config.json"),
                         torch_dtype=str(model.dtype).replace("torch.", ""))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
