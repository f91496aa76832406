"""Training text: files → V4 token ids → deterministic batches.

The default corpus is the ``.py`` files of the standard library of the running Python
(``sysconfig.get_paths()["stdlib"]``, without ``site-packages``/``dist-packages``): real code,
on every machine, no download. Each file becomes ``[BOS] + tokens``; the files are split into
training and validation sets by file (every ``round(1/val_fraction)``-th file of the sorted list
is held out), and each set is one concatenated stream of token ids.

Batches are random windows of the training stream drawn from a generator seeded by
``(seed, step)``: the batch of step t is a pure function of t, so a resumed run sees exactly the
batches of an uninterrupted one, and anticipatory routing can fetch step t's batch at t − Δt.
"""

from __future__ import annotations

import math
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

__all__ = ["stdlib_files", "collect_files", "split_files", "Corpus", "unigram_entropy",
           "SEED_LIMIT"]

#: Seeds of a training run lie in [0, SEED_LIMIT): the batch generator of step t is seeded with
#: ``seed * 1_000_003 + t``, which then stays far inside int64 (below 2**52 + t).
SEED_LIMIT = 2 ** 32


def stdlib_files() -> list[Path]:
    """The ``.py`` files of the running Python's standard library (sorted), without
    ``site-packages`` / ``dist-packages``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py")
                  if p.is_file() and not (skip & set(p.relative_to(root).parts)))


def collect_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand ``paths``: a file is taken as is, a directory contributes its ``*.py`` files
    (recursively). Sorted, duplicates removed.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: nothing was found.
    """
    out: set[Path] = set()
    for p in map(Path, paths):
        if p.is_dir():
            out.update(q for q in p.rglob("*.py") if q.is_file())
        elif p.is_file():
            out.add(p)
        else:
            raise FileNotFoundError(f"training data path not found: {p}")
    if not out:
        raise ValueError(f"no training files found in {', '.join(map(str, paths))} "
                         "(directories contribute their *.py files)")
    return sorted(out)


def split_files(files: Sequence[Path], val_fraction: float) -> tuple[list[Path], list[Path]]:
    """(train, val): every ``round(1/val_fraction)``-th file (starting with the middle one of
    the first stride) is held out; at least one file stays on each side when there are two.

    Raises ValueError for val_fraction outside (0, 0.5] or fewer than 2 files.
    """
    if not 0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5], got {val_fraction}")
    if len(files) < 2:
        raise ValueError(f"need at least 2 files to hold out a validation split, got {len(files)}")
    stride = max(2, round(1 / val_fraction))
    first = min(stride // 2, len(files) - 1)
    val = [f for i, f in enumerate(files) if i % stride == first % stride]
    train = [f for i, f in enumerate(files) if i % stride != first % stride]
    return train, val


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats) of the token frequency distribution of ``tokens``: the loss of the best
    context-free predictor on that stream."""
    counts = np.bincount(tokens.astype(np.int64))
    p = counts[counts > 0] / len(tokens)
    return float(-(p * np.log(p)).sum())


def _encode(files: Sequence[Path], tokenizer, bos: int) -> np.ndarray:
    texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]
    out: list[np.ndarray] = []
    batch = 64
    for i in range(0, len(texts), batch):
        for enc in tokenizer.encode_batch(texts[i:i + batch], add_special_tokens=False):
            out.append(np.asarray([bos] + enc.ids, dtype=np.int32))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int32)


@dataclass
class Corpus:
    """Tokenised training and validation streams (int32 numpy arrays of token ids)."""

    train: np.ndarray
    val: np.ndarray
    n_train_files: int
    n_val_files: int

    @classmethod
    def from_files(cls, files: Sequence[Path], tokenizer, val_fraction: float = 0.02,
                   bos_token_id: int = 0) -> "Corpus":
        """Tokenise ``files`` with ``tokenizer`` (a ``tokenizers.Tokenizer``) after
        :func:`split_files`."""
        train, val = split_files(list(files), val_fraction)
        return cls(_encode(train, tokenizer, bos_token_id), _encode(val, tokenizer, bos_token_id),
                   len(train), len(val))

    def check(self, length: int, vocab_size: int) -> None:
        """Raise ValueError if a stream is shorter than one window of ``length`` tokens or
        holds ids outside the vocabulary."""
        for name, s in (("training", self.train), ("validation", self.val)):
            if len(s) < length:
                raise ValueError(f"the {name} split has {len(s)} tokens, fewer than one window "
                                 f"of seq_len + 2 = {length}; give more data or a shorter "
                                 "--seq-len")
            if len(s) and int(s.max()) >= vocab_size:
                raise ValueError(f"token id {int(s.max())} is outside the model's vocabulary "
                                 f"({vocab_size})")

    def batch(self, step: int, batch_size: int, length: int, seed: int = 0) -> torch.Tensor:
        """int64 [batch_size, length]: random windows of the training stream for ``step``
        (a pure function of ``(seed, step)``)."""
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))
        starts = torch.randint(0, len(self.train) - length + 1, (batch_size,), generator=g)
        return torch.from_numpy(np.stack([self.train[s:s + length] for s in starts.tolist()])
                                ).long()

    def val_batches(self, n_windows: int, batch_size: int, length: int
                    ) -> list[torch.Tensor]:
        """Fixed validation windows (evenly spaced over the stream), in batches."""
        n = max(1, min(n_windows, len(self.val) // length))
        starts = np.linspace(0, len(self.val) - length, n).astype(np.int64)
        rows = np.stack([self.val[s:s + length] for s in starts])
        return [torch.from_numpy(rows[i:i + batch_size]).long()
                for i in range(0, n, batch_size)]
