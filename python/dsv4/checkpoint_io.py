"""Reading checkpoint files safely: confined paths, guarded JSON, lazily read safetensors shards.

* :func:`confined_path`: a file named by a checkpoint (an index ``weight_map`` entry, a listed
  shard, ``config.json``) must resolve inside the checkpoint directory: a relative path without
  ``..``, whose resolved target (symlinks followed) stays in the directory. The one exception is
  the Hugging Face hub cache, whose ``…/models--org--name/snapshots/<rev>/`` files are symlinks
  to ``../../blobs/<hash>``: there the repository folder ``…/models--org--name/blobs`` is
  inside too.
* :func:`read_json`: ``json.load`` whose failures (including a ``RecursionError`` from deeply
  nested input) become the caller's error type, naming the file.
* :class:`SafetensorsFile`: the safetensors format (an 8-byte little-endian header length, a
  JSON header ``{name: {dtype, shape, data_offsets}}``, then the data) read with positioned
  reads into freshly allocated tensors, one tensor at a time. ``safetensors.safe_open`` maps
  the whole file copy-on-write (``MAP_PRIVATE``), which counts the file's size against the
  kernel's commit limit: a shard larger than RAM + swap fails to open with "Cannot allocate
  memory". Reading with ``readinto`` needs memory for one tensor only, and a file truncated
  while it is read gives an error instead of a SIGBUS. The header is validated completely
  (no name twice, known dtypes, shapes of non-negative ints, byte ranges that match the shape
  and cover the data section exactly: no overlap, hole or trailing bytes, as
  ``safetensors.safe_open`` requires) before any tensor is read.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch

__all__ = ["confined_path", "read_json", "SafetensorsFile", "MAX_HEADER_BYTES"]

#: The largest safetensors header accepted (the limit of the safetensors library, 100 MB).
MAX_HEADER_BYTES = 100_000_000


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def _hub_blobs(root: str) -> Optional[str]:
    """``…/models--x--y/blobs`` when ``root`` is a Hugging Face hub cache snapshot folder."""
    snapshots = os.path.dirname(root)
    repo = os.path.dirname(snapshots)
    if os.path.basename(snapshots) == "snapshots" and "--" in os.path.basename(repo):
        return os.path.join(repo, "blobs")
    return None


def confined_path(directory: str, name: Any, what: str, error: type[Exception]) -> str:
    """The path of file ``name`` of checkpoint ``directory``, if it stays inside the directory.

    Args:
        directory: the checkpoint directory.
        name: the file name as the checkpoint gives it (e.g. an index ``weight_map`` value).
        what: how to name the entry in an error, e.g. ``"index entry 'norm.weight' ->
            'x.safetensors'"``.
        error: the exception type to raise (``CheckpointError`` / ``ConvertError``).

    Returns:
        The resolved path (symlinks followed).

    Raises:
        ``error``: ``name`` is not a non-empty string, is absolute, holds a ``..`` component or
        a NUL, or resolves (through symlinks) outside ``directory`` -- except into the
        ``blobs`` folder of a Hugging Face hub cache repository (module docstring).
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        raise error(f"{what}: a file name must be a non-empty string, got {name!r}")
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts:
        raise error(f"{what}: refused: the file must be named relative to the checkpoint "
                    f"directory {directory} without '..' (got {name!r})")
    root = os.path.realpath(directory)
    target = os.path.realpath(os.path.join(root, name))
    blobs = _hub_blobs(root)
    if not (_inside(target, root) or (blobs is not None and _inside(target, blobs))):
        raise error(f"{what}: refused: {name!r} resolves to {target}, outside the checkpoint "
                    f"directory {root} (a symlink leaving the directory)")
    return target


def read_json(path: str, what: str, error: type[Exception]) -> Any:
    """``json.load`` of ``path``; any failure is ``error`` naming ``what`` and the file.

    Raises ``error`` for an unreadable file, invalid JSON, or JSON nested too deeply for the
    parser (Python's ``RecursionError``).
    """
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise error(f"cannot read {what} {path}: {e}") from None
    except RecursionError:
        raise error(f"cannot read {what} {path}: JSON nested too deeply") from None


def _dtype_tables() -> tuple[dict[str, torch.dtype], dict[str, int]]:
    from .convert import _ITEM_BITS, DTYPE_NAMES   # the writer's tables (one definition)
    return {v: k for k, v in DTYPE_NAMES.items()}, _ITEM_BITS


class _DuplicateKey(Exception):
    """A JSON object of a safetensors header gives a key twice (``args[0]``)."""


def _unique_keys(pairs: list) -> dict:
    """``object_pairs_hook`` refusing a key given twice: a tensor listed twice (which one
    would be read?) is refused, as ``safetensors.safe_open`` does."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


class SafetensorsFile:
    """One safetensors file, opened and validated from its header; tensors read on demand.

    Attributes:
        path: the file.
        tensors: ``{name: (dtype string, shape, (begin, end) byte offsets in the data)}`` in
            header order; shapes are as the header records them (``F4`` counts 4-bit values).
        metadata: the header's ``__metadata__`` (a dict of strings) or ``{}``.

    Raises ``error`` (the constructor's argument, e.g. ``CheckpointError``) naming the file for:
    a file shorter than its header, a header length of 0 or above :data:`MAX_HEADER_BYTES`,
    a header that is not a JSON object of tensor entries (a key given twice, unknown dtype,
    bad shape, byte range of the wrong size or outside the file, byte ranges that overlap,
    leave a hole or leave bytes after the last tensor), and, when reading, a file that ends
    early.
    """

    def __init__(self, path: str, error: type[Exception] = ValueError):
        self.path, self._error = path, error
        self._file = None
        try:
            self._file = open(path, "rb")
            size = os.fstat(self._file.fileno()).st_size
            head = self._file.read(8)
            if len(head) < 8:
                self._fail("file shorter than the 8-byte header length (truncated or not a "
                           "safetensors file?)")
            n = int.from_bytes(head, "little")
            if not 2 <= n <= MAX_HEADER_BYTES:
                self._fail(f"header length {n} outside [2, {MAX_HEADER_BYTES}] (not a "
                           "safetensors file?)")
            if 8 + n > size:
                self._fail(f"header of {n} bytes but the file has {size} bytes (truncated?)")
            raw = self._file.read(n)
            try:
                header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
            except _DuplicateKey as e:
                self._fail(f"header lists {e.args[0]!r} twice")
            except (UnicodeDecodeError, ValueError) as e:
                self._fail(f"header is not JSON ({e}; truncated or not a safetensors file?)")
            except RecursionError:
                self._fail("header JSON nested too deeply")
            self._data_start = 8 + n
            self._parse(header, size - self._data_start)
        except OSError as e:
            self.close()
            raise error(f"cannot read {path}: {e}") from None
        except BaseException:
            self.close()
            raise

    def _fail(self, msg: str) -> None:
        raise self._error(f"cannot read {self.path}: {msg}")

    def _parse(self, header: Any, data_bytes: int) -> None:
        names, bits = _dtype_tables()
        if not isinstance(header, dict):
            self._fail("header is not a JSON object")
        meta = header.get("__metadata__", {})
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            self._fail("__metadata__ must be an object of strings")
        self.metadata = dict(meta)
        self.tensors: dict[str, tuple[str, tuple[int, ...], tuple[int, int]]] = {}
        for name, e in header.items():
            if name == "__metadata__":
                continue
            ok = (isinstance(e, dict) and e.get("dtype") in names
                  and isinstance(e.get("shape"), list)
                  and all(type(s) is int and s >= 0 for s in e["shape"])
                  and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2
                  and all(type(o) is int for o in e["data_offsets"]))
            if not ok:
                self._fail(f"bad header entry for {name!r}: {str(e)[:200]} (expected "
                           "{dtype: one of " + ", ".join(sorted(names)) + ", shape: [ints >= 0], "
                           "data_offsets: [begin, end]})")
            dtype, shape = e["dtype"], tuple(e["shape"])
            begin, end = e["data_offsets"]
            count = 1
            for s in shape:
                count *= s
            want = count * bits[dtype]
            if not 0 <= begin <= end <= data_bytes or (end - begin) * 8 != want:
                self._fail(f"tensor {name!r} ({dtype} {list(shape)}) has data_offsets "
                           f"[{begin}, {end}] but needs {want / 8:g} bytes inside the "
                           f"{data_bytes} data bytes of the file (truncated?)")
            self.tensors[name] = (dtype, shape, (begin, end))
        # The data section is the tensors back to back, as the format defines it and
        # safetensors.safe_open requires: no overlap, no hole, nothing after the last one.
        at, last = 0, None
        for name, (_, _, (begin, end)) in sorted(self.tensors.items(), key=lambda t: t[1][2]):
            if begin < at:
                self._fail(f"tensors overlap in the file: {name!r} starts at data byte {begin}, "
                           f"before the end {at} of {last!r}")
            if begin > at:
                self._fail(f"hole in the data: {name!r} starts at data byte {begin}, but "
                           + (f"{last!r} ends at {at}" if last else "the data starts at 0"))
            at, last = end, name
        if at != data_bytes:
            self._fail(f"{data_bytes - at} trailing byte(s) after the last tensor ("
                       + (f"{last!r} ends at data byte {at} of {data_bytes})" if last else
                          "the header lists none)"))

    def keys(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` on the CPU (a fresh tensor; the file is read from disk now).

        ``F4`` tensors come as ``float4_e2m1fn_x2`` with the last dim halved (two values a
        byte), as torch holds them. Raises KeyError for an unknown name and the constructor's
        ``error`` when the file ends early.
        """
        dtype, shape, (begin, end) = self.tensors[name]
        torch_dtype = _dtype_tables()[0][dtype]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        view = memoryview(buf.numpy()).cast("B")
        self._file.seek(self._data_start + begin)
        done = 0
        while done < len(view):
            got = self._file.readinto(view[done:])
            if not got:
                self._fail(f"tensor {name!r}: the file ends after {done} of its "
                           f"{len(view)} bytes (truncated?)")
            done += got
        if dtype == "F4":
            shape = shape[:-1] + (shape[-1] // 2,)
        return buf.view(torch_dtype).reshape(shape)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
