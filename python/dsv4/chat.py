"""DeepSeek-V4 chat prompt encoding and completion parsing (architecture.md §13.2).

No Jinja chat template ships with DeepSeek-V4; the release defines the prompt format in Python,
``encoding/encoding_dsv4.py`` of the Hugging Face model repositories (``deepseek-ai/DeepSeek-V4-Flash``
at commit 60d8d70, identical in ``DeepSeek-V4-Pro``). This module re-implements that format. Sources
read (none of their code is copied; the literal strings of the format -- special tokens, the tool
instructions and the Think-Max instruction -- are data and match the release byte for byte):

* ``supermy/ds4rs`` : ``encoding/encoding_dsv4.py`` and ``encoding/test_encoding_dsv4.py`` -- a copy of
  the April release with Chinese comments (``REASONING_EFFORT_MAX`` only; effort ``"high"`` adds
  nothing). This is the version followed here.
* the release's ``encoding/README.md`` (public copies), which documents the same format.
* golden prompts: the release's ``encoding/tests/test_output_{1,2,3}.txt`` as transcribed in
  ``osaurus-ai`` Swift tests (``DeepseekV4ChatEncoderTests``, ``DeepSeekV4ToolEncodingTests``), which
  also carry prompts rendered by the release's Python file for the chat / Think-Max cases.
* ``vllm-project/vllm`` : ``vllm/tokenizers/deepseek_v4.py`` (request-level ``tools`` are attached to
  the leading system/developer message, or a content-less system message is inserted).

A later copy (``sfxnz/DeepSeek-V4-Flash-Vision-Exp-vLLM-2x-DGX-Spark`` : ``encoding/encoding_dsv4.py``,
and vLLM's ``deepseek_v4_encoding.py``) belongs to the Flash-0731 revision: there effort ``"high"`` uses
the April Think-Max text and ``"max"`` a new one. It is *not* what the April weights were trained with.

Format (``P`` = prompt text)::

    BOS [Think-Max instruction] system [\\n\\n## Tools ...] [\\n\\n## Response Format ...]
    <｜User｜>user text<｜Assistant｜></think>answer<｜end▁of▁sentence｜>       (chat mode)
    <｜User｜>user text<｜Assistant｜><think>reasoning</think>answer[\\n\\n<｜DSML｜tool_calls>...]EOS
    <｜User｜><tool_result>...</tool_result><｜Assistant｜><think>                (thinking modes)

Inference modes of the release (model card: "Non-think", "Think High", "Think Max"):

* ``"chat"``: ``thinking_mode="chat"``; every assistant turn opens with ``</think>``.
* ``"think-high"``: ``thinking_mode="thinking"``, no effort instruction; the prompt ends with ``<think>``.
* ``"think-max"``: as think-high, plus :data:`THINK_MAX_PROMPT` at the very start (after BOS,
  before the system text).

In thinking modes the reasoning of assistant turns before the last user message is dropped
(``drop_thinking``), unless any message carries ``tools`` (then every turn keeps its reasoning).
There is no ``tool`` role in the format: tool results are merged into a user turn as
``<tool_result>...</tool_result>`` blocks, ordered like the calls of the preceding assistant turn.

Token ids are never written here: the text is tokenised by the DeepSeek-V4 tokenizer, in which
every special string above is one added token (:func:`special_token_ids`, :func:`encode_chat`).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .tokenizer import check_unicode

__all__ = [
    "ASSISTANT",
    "BOS",
    "ChatPrompt",
    "DSML",
    "EOS",
    "LATEST_REMINDER",
    "MODES",
    "SPECIAL_TEXT",
    "SPECIAL_TOKEN_MODES",
    "TASK_TOKENS",
    "THINK_END",
    "THINK_MAX_PROMPT",
    "THINK_START",
    "USER",
    "CompletionSplitter",
    "ParsedCompletion",
    "ToolCall",
    "encode_chat",
    "encode_messages",
    "parse_completion",
    "render_tools",
    "special_token_ids",
    "text_only_tokenizer",
]

# ---------------------------------------------------------------- the format's strings (data)

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
LATEST_REMINDER = "<｜latest_reminder｜>"
TASK_TOKENS: dict[str, str] = {
    "action": "<｜action｜>",
    "query": "<｜query｜>",
    "authority": "<｜authority｜>",
    "domain": "<｜domain｜>",
    "title": "<｜title｜>",
    "read_url": "<｜read_url｜>",
}

TOOL_RESULT_OPEN = "<tool_result>"
TOOL_RESULT_CLOSE = "</tool_result>"
TOOL_CALLS_OPEN = f"<{DSML}tool_calls>"
TOOL_CALLS_CLOSE = f"</{DSML}tool_calls>"
# An assistant turn's DSML block always follows a blank line; the parser splits on this.
TOOL_CALLS_MARKER = f"\n\n<{DSML}tool_calls"

#: The Think-Max instruction of the April release (``REASONING_EFFORT_MAX``), verbatim.
THINK_MAX_PROMPT = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
    "edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n"
)

_TOOLS_PROMPT = (
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke tools "
    f'by writing a "<{DSML}tool_calls>" block like the following:\n\n'
    f"<{DSML}tool_calls>\n"
    f'<{DSML}invoke name="$TOOL_NAME">\n'
    f'<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>\n'
    "...\n"
    f"</{DSML}invoke>\n"
    f'<{DSML}invoke name="$TOOL_NAME2">\n'
    "...\n"
    f"</{DSML}invoke>\n"
    f"</{DSML}tool_calls>\n\n"
    'String parameters should be specified as is and set `string="true"`. For all other types '
    '(numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.\n\n'
    f"If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete "
    f"reasoning inside {THINK_START}...{THINK_END} BEFORE any tool calls or final response.\n\n"
    f"Otherwise, output directly after {THINK_END} with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
    "{schemas}\n\n"
    "You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
)
_RESPONSE_FORMAT_PROMPT = (
    "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{schema}"
)

#: mode name -> (the release's ``thinking_mode``, whether the Think-Max instruction is added)
MODES: dict[str, tuple[str, bool]] = {
    "chat": ("chat", False),
    "think-high": ("thinking", False),
    "think-max": ("thinking", True),
}

_ROLES = ("system", "user", "assistant", "tool", "developer", "latest_reminder")
_USER_LIKE = ("user", "developer")
# Roles that survive the drop-thinking pass wherever they are (the release's list).
_KEPT_ROLES = ("user", "system", "tool", "latest_reminder", "direct_search_results")


def _to_json(value: Any, allow_nan: bool = True) -> str:
    """JSON text as the release writes it: ``json.dumps`` with non-ASCII kept, default separators."""
    return json.dumps(value, ensure_ascii=False, allow_nan=allow_nan)


def _json_of(value: Any, where: str) -> str:
    """:func:`_to_json`, with a ValueError naming ``where`` for a value JSON cannot hold (NaN
    and infinities included: ``json.dumps`` would write them as ``NaN`` / ``Infinity``, which
    no JSON parser reads)."""
    try:
        return _to_json(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where} must be JSON-serialisable (dicts, lists, strings, finite "
                         f"numbers, booleans, None): {e}") from None
    except RecursionError:
        raise ValueError(f"{where} is nested too deeply to be written as JSON") from None


def _is_list(value: Any) -> bool:
    """A list-like sequence (not a string, bytes or a dict)."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes, Mapping))


def _check_mode(mode: str) -> tuple[bool, bool]:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(repr(m) for m in MODES)}, got {mode!r}")
    thinking_mode, think_max = MODES[mode]
    return thinking_mode == "thinking", think_max


# ---------------------------------------------------------------- caller content vs the format

#: Values of ``special_tokens`` (:func:`encode_messages`).
SPECIAL_TOKEN_MODES = ("escape", "reject", "verbatim")

#: Text that looks like a DeepSeek special token: every added token of the V4 tokenizer has one
#: of these shapes (``<｜...｜>``, ``<｜/table>｜``, ``｜DSML｜``, ``<think>``, ``</think>``,
#: ``<|EOT|>``, ``<|place_holder_mm_span_N|>``, ``<dsml:``, ``</dsml:``; tests check all
#: 1,283). ``special_tokens="reject"`` refuses content that contains a match.
SPECIAL_TEXT = re.compile(r"<｜[^｜\n]{1,64}｜>?|｜DSML｜|</?think>|<\|(?:EOT|place_holder_\w{1,40})\|>"
                          r"|</?dsml:")


class _Writer:
    """Builds the prompt text and records which character spans are caller content."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.parts: list[str] = []
        self.spans: list[tuple[int, int]] = []
        self.length = 0

    def format(self, text: str) -> None:
        """Text the format writes (control tokens, the release's fixed prose)."""
        self.parts.append(text)
        self.length += len(text)

    def content(self, text: str, where: str) -> None:
        """Caller text: escaped, rejected or kept verbatim according to ``mode``."""
        if not text:
            return
        if self.mode == "reject":
            m = SPECIAL_TEXT.search(text)
            if m:
                raise ValueError(
                    f"{where} contains the special-token text {m.group()!r} (at offset "
                    f"{m.start()}); special_tokens='reject' refuses it ('escape', the default, "
                    "encodes it as ordinary text)")
        if self.spans and self.spans[-1][1] == self.length:
            self.spans[-1] = (self.spans[-1][0], self.length + len(text))
        else:
            self.spans.append((self.length, self.length + len(text)))
        self.parts.append(text)
        self.length += len(text)

    def text(self) -> str:
        return "".join(self.parts)


class ChatPrompt(str):
    """A rendered prompt (:func:`encode_messages`): the text, plus where the caller's content is.

    A ``str`` equal to the release's prompt text. Attributes:

    * ``content_spans``: ``((start, end), ...)`` character ranges of caller content.
    * ``special_tokens``: the mode it was rendered with (:data:`SPECIAL_TOKEN_MODES`).

    String operations return plain ``str`` (without the spans).
    """

    content_spans: tuple[tuple[int, int], ...]
    special_tokens: str

    def __new__(cls, text: str, content_spans=(), special_tokens: str = "escape"):
        self = super().__new__(cls, text)
        self.content_spans = tuple(content_spans)
        self.special_tokens = special_tokens
        return self

    def token_ids(self, tokenizer: Any) -> list[int]:
        """Token ids (no added specials) of this prompt for ``tokenizer``.

        ``special_tokens="verbatim"``: ``tokenizer.encode(text)``, as the release does, so
        special-token text anywhere becomes control ids. Otherwise the format's own text is
        split at the tokenizer's added tokens (each one id) and everything else -- the format's
        plain text and the caller content -- is encoded by the same tokenizer with no added
        token matched (:func:`text_only_tokenizer`). Special-token text inside content thus
        becomes ordinary text tokens, and a prompt without any gets exactly the release's ids
        (the tokenizer splits on added tokens first and tokenises the pieces between them on
        their own, which is what happens here).
        """
        check_unicode(str(self), "the chat prompt")   # (tool schemas, arguments, ...)
        if self.special_tokens == "verbatim":
            return list(tokenizer.encode(str(self), add_special_tokens=False).ids)
        text_only, added, pattern = _tokenizer_tables(tokenizer)
        ids: list[int] = []
        plain: list[str] = []

        def flush() -> None:
            if plain:
                ids.extend(text_only.encode("".join(plain), add_special_tokens=False).ids)
                plain.clear()

        def format_text(a: int, b: int) -> None:
            pos = a
            for m in pattern.finditer(self, a, b):
                plain.append(self[pos:m.start()])
                flush()
                ids.append(added[m.group()])
                pos = m.end()
            plain.append(self[pos:b])

        pos = 0
        for a, b in self.content_spans:
            format_text(pos, a)
            plain.append(self[a:b])
            pos = b
        format_text(pos, len(self))
        flush()
        return ids


_TABLES: dict[int, tuple[Any, tuple]] = {}


def text_only_tokenizer(tokenizer: Any) -> Any:
    """A copy of ``tokenizer`` without its added tokens: it encodes any string as ordinary
    (byte-level BPE) text, e.g. ``"<｜User｜>"`` as ``<``, ``｜``, ``User``, ... Ids mean the
    same in both (the BPE vocabulary is shared); built once per tokenizer."""
    return _tokenizer_tables(tokenizer)[0]


def _tokenizer_tables(tokenizer: Any) -> tuple[Any, dict[str, int], "re.Pattern[str]"]:
    """(text-only copy, ``{added token text: id}``, a regex of the added tokens, longest first
    -- the leftmost-longest matching of ``tokenizers``)."""
    hit = _TABLES.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    from tokenizers import Tokenizer

    spec = json.loads(tokenizer.to_str())
    added = {t["content"]: int(t["id"]) for t in spec.get("added_tokens", [])}
    spec["added_tokens"] = []
    text_only = Tokenizer.from_str(json.dumps(spec))
    pattern = re.compile("|".join(re.escape(t) for t in sorted(added, key=len, reverse=True))
                         or r"(?!)")
    _TABLES[id(tokenizer)] = (tokenizer, (text_only, added, pattern))
    return text_only, added, pattern


# ---------------------------------------------------------------- tools and tool calls


def _function_of(tool: Any, i: int) -> Mapping[str, Any]:
    if not isinstance(tool, Mapping):
        raise ValueError(f"tools[{i}] must be a dict, got {type(tool).__name__}")
    fn = tool.get("function", tool)  # OpenAI format {"type": "function", "function": {...}} or bare
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn.get("name"):
        raise ValueError(
            f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'description': ..., "
            f"'parameters': ...}}}} or the inner function dict with a non-empty 'name', got {tool!r}"
        )
    return fn


def render_tools(tools: Sequence[Any]) -> str:
    """The ``## Tools`` section that a system/developer message carries (release ``render_tools``).

    Args:
        tools: OpenAI-format tool dicts (``{"type": "function", "function": {...}}``) or the inner
            function dicts. Each function dict is written as one line of JSON, keys in the given
            order, non-ASCII characters kept.

    Returns:
        The section text (ends with a newline).

    Raises:
        ValueError: a tool is not a dict or has no function name.
    """
    w = _Writer("verbatim")
    _write_tools(w, tools, "tools")
    return w.text()


def _write_tools(w: "_Writer", tools: Sequence[Any], where: str) -> None:
    """The ``## Tools`` section: the release's instructions (format text) around the callers'
    schemas (content)."""
    head, tail = _TOOLS_PROMPT.split("{schemas}")
    w.format(head)
    for i, t in enumerate(tools):
        if i:
            w.format("\n")
        w.content(_json_of(dict(_function_of(t, i)), f"{where}[{i}]"), f"{where}[{i}]")
    w.format(tail)


def _call_name_and_args(call: Any, where: str) -> tuple[str, Any, str]:
    """(name, arguments, id) of an OpenAI-format or ``{"name", "arguments"}`` tool call."""
    if not isinstance(call, Mapping):
        raise ValueError(f"{where} must be a dict, got {type(call).__name__}")
    fn = call.get("function", call)
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise ValueError(
            f"{where} must be {{'id': ..., 'type': 'function', 'function': {{'name': str, "
            f"'arguments': JSON str}}}}, got {call!r}"
        )
    call_id = call.get("id") or fn.get("id") or ""
    return fn["name"], fn.get("arguments", "{}"), str(call_id)


def _check_dsml_name(name: str, what: str, w: "_Writer") -> None:
    """A tool or parameter name sits in ``name="..."`` on one line: a quote or a newline would
    end it early, so the parser could not read the call back (refused unless verbatim)."""
    if w.mode != "verbatim" and ('"' in name or "\n" in name):
        raise ValueError(f"{what} {name!r} contains a double quote or a newline, which the DSML "
                         "tool call format cannot hold (special_tokens='verbatim' renders it "
                         "as the release would, unreadably)")


def _write_parameters(w: "_Writer", arguments: Any, where: str) -> None:
    """DSML ``parameter`` lines of one call (release ``encode_arguments_to_dsml``).

    ``arguments`` is the OpenAI JSON string (or, as an extension, an already-parsed dict). Text that
    is not JSON becomes one string parameter named ``arguments``, as in the release.

    A value containing the closing tag ``</｜DSML｜parameter>`` cannot be written as the
    release writes it (the parser would end the value there and read the rest as markup). Unless
    ``special_tokens="verbatim"``, such a string is written as a JSON string (``string="false"``)
    and in any JSON value the ``<`` of that tag is written ``\\u003c``: valid JSON that
    :func:`parse_completion` reads back to exactly the same value.
    """
    if isinstance(arguments, Mapping):
        args = dict(arguments)
    else:
        if not isinstance(arguments, str):
            raise ValueError(f"{where} arguments must be a JSON object string, got {arguments!r}")
        try:
            args = json.loads(arguments)
        except json.JSONDecodeError:
            args = {"arguments": arguments}
        except RecursionError:
            raise ValueError(f"{where} arguments are nested too deeply to be read as "
                             "JSON") from None
        if not isinstance(args, dict):
            raise ValueError(f"{where} arguments must be a JSON object, got {arguments!r}")
    for k, (key, value) in enumerate(args.items()):
        key = str(key)
        _check_dsml_name(key, f"{where} parameter name", w)
        is_str = isinstance(value, str)
        text = value if is_str else _json_of(value, f"{where} argument {key!r}")
        if w.mode != "verbatim" and _PARAM_CLOSE in text:
            text = (_to_json(value) if is_str else text).replace(_PARAM_CLOSE, _PARAM_CLOSE_JSON)
            is_str = False
        if k:
            w.format("\n")
        w.format(f'<{DSML}parameter name="')
        w.content(key, f"{where} parameter name")
        w.format(f'" string="{"true" if is_str else "false"}">')
        w.content(text, f"{where} argument {key!r}")
        w.format(_PARAM_CLOSE)


def _write_tool_calls(w: "_Writer", calls: Sequence[Any], where: str) -> None:
    w.format("\n\n" + TOOL_CALLS_OPEN + "\n")
    for j, call in enumerate(calls):
        name, arguments, _ = _call_name_and_args(call, f"{where}.tool_calls[{j}]")
        _check_dsml_name(name, f"{where}.tool_calls[{j}] name", w)
        if j:
            w.format("\n")
        w.format(f'<{DSML}invoke name="')
        w.content(name, f"{where}.tool_calls[{j}] name")
        w.format('">\n')
        _write_parameters(w, arguments, f"{where}.tool_calls[{j}]")
        w.format(f"\n</{DSML}invoke>")
    w.format("\n" + TOOL_CALLS_CLOSE)


# ---------------------------------------------------------------- message preprocessing


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of dicts with a 'role' key")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"messages[{i}] must be a dict, got {type(m).__name__}")
        role = m.get("role")
        if role not in _ROLES:
            raise ValueError(
                f"messages[{i}]['role'] must be one of {', '.join(_ROLES)}, got {role!r}"
            )
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            raise ValueError(
                f"messages[{i}]['content'] must be a string (or None), got {type(content).__name__}"
            )
        if content is not None:
            check_unicode(content, f"messages[{i}]['content']")
        task = m.get("task")
        if task is not None and (not isinstance(task, str) or task not in TASK_TOKENS):
            raise ValueError(
                f"messages[{i}]['task'] must be one of {', '.join(TASK_TOKENS)}, got {task!r}"
            )
        if role == "developer" and not content:
            raise ValueError(f"messages[{i}]: a developer message needs non-empty content")
        reasoning = m.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise ValueError(f"messages[{i}]['reasoning_content'] must be a string (or None), "
                             f"got {type(reasoning).__name__}")
        if reasoning is not None:
            check_unicode(reasoning, f"messages[{i}]['reasoning_content']")
        for key, what in (("tool_calls", "tool call dicts"), ("tools", "tool dicts")):
            if m.get(key) is not None and not _is_list(m[key]):
                raise ValueError(f"messages[{i}]['{key}'] must be a list of {what} (or None), "
                                 f"got {type(m[key]).__name__}")
        try:
            out.append(copy.deepcopy(dict(m)) | {"_index": i})
        except RecursionError:
            raise ValueError(f"messages[{i}] is nested too deeply to be copied or written as "
                             "JSON") from None
    return out


def _merge_tool_results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fold ``tool`` messages (and the user text around them) into user turns of content blocks.

    Release ``merge_tool_messages``: a tool result joins the preceding user turn if that turn
    already holds blocks, else it opens a new user turn; a user message joins a preceding user turn
    that holds blocks and has no task. Blocks are rendered joined by a blank line.
    """
    merged: list[dict[str, Any]] = []
    for m in messages:
        role = m["role"]
        prev = merged[-1] if merged else None
        prev_is_block_user = prev is not None and prev["role"] == "user" and "content_blocks" in prev
        if role == "tool":
            block = {"type": "tool_result", "tool_use_id": str(m.get("tool_call_id") or ""),
                     "content": m.get("content") or "", "_index": m["_index"]}
            if prev_is_block_user:
                prev["content_blocks"].append(block)
            else:
                merged.append({"role": "user", "content_blocks": [block], "_index": m["_index"]})
        elif role == "user":
            block = {"type": "text", "text": m.get("content") or "", "_index": m["_index"]}
            if prev_is_block_user and prev.get("task") is None:
                prev["content_blocks"].append(block)
            else:
                new = {"role": "user", "content": m.get("content") or "", "content_blocks": [block],
                       "_index": m["_index"]}
                for key in ("task", "wo_eos"):
                    if key in m:
                        new[key] = m[key]
                merged.append(new)
        else:
            merged.append(m)
    return merged


def _order_tool_results(messages: list[dict[str, Any]]) -> None:
    """Sort each user turn's tool results by the call order of the last assistant turn with calls.

    Release ``sort_tool_results_by_call_order`` (stable sort; an unknown id sorts as position 0).
    Text blocks keep their slots. In place.
    """
    order: dict[str, int] = {}
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            order = {}
            for j, call in enumerate(m["tool_calls"]):
                _, _, call_id = _call_name_and_args(call, f"assistant tool_calls[{j}]")
                if call_id:
                    order[call_id] = j
        elif m["role"] == "user" and m.get("content_blocks"):
            slots = [k for k, b in enumerate(m["content_blocks"]) if b.get("type") == "tool_result"]
            if len(slots) > 1 and order:
                results = sorted((m["content_blocks"][k] for k in slots),
                                 key=lambda b: order.get(b.get("tool_use_id", ""), 0))
                for k, b in zip(slots, results):
                    m["content_blocks"][k] = b


def _last_user_index(messages: Sequence[Mapping[str, Any]]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] in _USER_LIKE:
            return i
    return -1


def _drop_old_reasoning(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Release ``_drop_thinking_messages``: before the last user/developer turn, assistant turns
    lose ``reasoning_content`` and developer messages are removed; later messages are kept."""
    last_user = _last_user_index(messages)
    out = []
    for i, m in enumerate(messages):
        if m["role"] in _KEPT_ROLES or i >= last_user:
            out.append(m)
        elif m["role"] == "assistant":
            out.append({k: v for k, v in m.items() if k != "reasoning_content"})
    return out


# ---------------------------------------------------------------- rendering


def _write_user_blocks(w: "_Writer", blocks: Sequence[Mapping[str, Any]]) -> None:
    for k, b in enumerate(blocks):
        if k:
            w.format("\n\n")
        kind = b.get("type")
        if kind == "text":
            w.content(b.get("text", ""), f"message {b.get('_index')} (user) content")
        elif kind == "tool_result":
            w.format(TOOL_RESULT_OPEN)
            w.content(str(b.get("content", "")), f"message {b.get('_index')} (tool) content")
            w.format(TOOL_RESULT_CLOSE)
        else:
            w.format(f"[Unsupported {kind}]")


def _write_message(w: "_Writer", i: int, messages: Sequence[Mapping[str, Any]], thinking: bool,
                   drop_thinking: bool, think_max: bool, generation_prompt: bool) -> None:
    """One message plus the transition that follows it (release ``render_message``)."""
    m = messages[i]
    role = m["role"]
    content = m.get("content") or ""
    where = f"message {m.get('_index', i)} ({role})"
    last_user = _last_user_index(messages)
    if i == 0 and thinking and think_max:
        w.format(THINK_MAX_PROMPT)

    if role in ("system", "developer"):
        if role == "developer":
            w.format(USER)
        w.content(content, f"{where} content")
        if m.get("tools"):
            w.format("\n\n")
            _write_tools(w, m["tools"], f"{where} tools")
        if m.get("response_format"):
            head, tail = _RESPONSE_FORMAT_PROMPT.split("{schema}")
            w.format("\n\n" + head)
            w.content(_json_of(m["response_format"], f"{where} response_format"),
                      f"{where} response_format")
            w.format(tail)
    elif role == "user":
        w.format(USER)
        blocks = m.get("content_blocks")
        if blocks:
            _write_user_blocks(w, blocks)
        else:
            w.content(content, f"{where} content")
    elif role == "latest_reminder":
        w.format(LATEST_REMINDER)
        w.content(content, f"{where} content")
    elif role == "assistant":
        prev_task = i > 0 and messages[i - 1].get("task") is not None
        if thinking and not prev_task and (not drop_thinking or i > last_user):
            w.content(m.get("reasoning_content") or "", f"{where} reasoning_content")
            w.format(THINK_END)
        w.content(content, f"{where} content")
        if m.get("tool_calls"):
            _write_tool_calls(w, m["tool_calls"], f"messages[{m.get('_index', i)}]")
        if not m.get("wo_eos"):
            w.format(EOS)
    else:  # pragma: no cover - tool messages were merged, roles were checked
        raise ValueError(f"unexpected role {role!r}")

    # The transition: only after the last message, or before an assistant/latest_reminder turn.
    if i + 1 < len(messages) and messages[i + 1]["role"] not in ("assistant", "latest_reminder"):
        return
    task = m.get("task")
    if task is not None:
        if task == "action":
            w.format(ASSISTANT + (THINK_START if thinking else THINK_END) + TASK_TOKENS[task])
        else:
            w.format(TASK_TOKENS[task])
    elif role in _USER_LIKE:
        if i == len(messages) - 1 and not generation_prompt:
            return
        opens_thinking = thinking and (not drop_thinking or i >= last_user)
        w.format(ASSISTANT + (THINK_START if opens_thinking else THINK_END))


def encode_messages(
    messages: Sequence[Mapping[str, Any]],
    mode: str = "chat",
    tools: Sequence[Any] | None = None,
    add_generation_prompt: bool = True,
    drop_thinking: bool = True,
    add_bos: bool = True,
    special_tokens: str = "escape",
) -> "ChatPrompt":
    """Render a conversation as a DeepSeek-V4 prompt string (release ``encode_messages``).

    Args:
        messages: OpenAI-style message dicts. ``role`` is one of ``system``, ``user``,
            ``assistant``, ``tool``, ``developer``, ``latest_reminder``; ``content`` a string (or
            ``None``). Assistant messages may carry ``reasoning_content`` (str) and ``tool_calls``
            (OpenAI format: ``{"id", "type": "function", "function": {"name", "arguments": JSON
            str}}``); tool messages ``tool_call_id``. System/developer messages may carry ``tools``
            and ``response_format``; a message may carry ``task`` (a key of :data:`TASK_TOKENS`,
            the release's quick-instruction tokens) and an assistant message ``wo_eos`` (no EOS:
            a prefix for the model to continue). The input is not modified.
        mode: ``"chat"`` (Non-think), ``"think-high"`` or ``"think-max"`` (see the module docstring).
        tools: request-level tool definitions; they are attached to the leading system/developer
            message (replacing its own ``tools``) or, if the conversation does not start with one,
            to a new content-less system message (vLLM's convention).
        add_generation_prompt: when the conversation ends with a user/developer turn, end the
            prompt with ``<｜Assistant｜>`` + ``</think>`` (chat) or ``<think>`` (thinking), as the
            release always does. ``False`` omits that tail (an extension, for scoring or training).
        drop_thinking: in thinking modes, drop the reasoning of assistant turns before the last user
            turn (release default). Ignored (treated as ``False``) when any message has ``tools``.
        add_bos: start with BOS (``<｜begin▁of▁sentence｜>``).
        special_tokens: what special-token text inside caller content becomes (the text of a
            user, system, developer, tool, latest_reminder or assistant message, reasoning,
            tool schemas, response formats, tool-call names and arguments: anything the format
            does not write itself). ``"escape"`` (default): ordinary text -- the prompt's
            :meth:`ChatPrompt.token_ids` / :func:`encode_chat` tokenise content without matching
            special tokens, so ``<｜User｜>`` typed by a user is the text tokens ``<``, ``｜``,
            ``User``, ... and never the control id (a user cannot forge turns, end the sequence
            or inject tool calls); tool-call arguments containing the DSML closing tag are
            written so that they parse back exactly (:func:`_write_parameters`).
            ``"reject"``: a ValueError naming the message, the field and the special text
            (:data:`SPECIAL_TEXT`). ``"verbatim"``: the release's behaviour -- the prompt is
            tokenised as one string, special-token text anywhere becomes control ids.

    Returns:
        A :class:`ChatPrompt`: the prompt text (a ``str``; identical in every mode) that also
        records which spans are caller content. Turn it into ids with
        ``prompt.token_ids(tokenizer)`` or :func:`encode_chat`. Tokenising the plain string
        yourself (``tokenizer.encode(prompt)``) is the release's verbatim behaviour and undoes
        the escaping: a string alone cannot say which ``<｜User｜>`` is a control token.

    Raises:
        ValueError: unknown mode, role or ``special_tokens``; non-string content or
            reasoning_content, an empty developer message, an unknown task, malformed tools or
            tool calls (not lists of dicts), arguments, tool schemas or a response_format that
            JSON cannot hold (a set, ...); with
            ``special_tokens="reject"``, special-token text in content; unless ``"verbatim"``,
            a tool or parameter name holding a double quote or a newline (DSML cannot hold it).
    """
    thinking, think_max = _check_mode(mode)
    if special_tokens not in SPECIAL_TOKEN_MODES:
        raise ValueError(f"special_tokens must be one of "
                         f"{', '.join(repr(m) for m in SPECIAL_TOKEN_MODES)}, got {special_tokens!r}")
    msgs = _check_messages(messages)
    if tools is not None and not _is_list(tools):
        raise ValueError(f"tools must be a list of tool dicts (or None), got "
                         f"{type(tools).__name__}")
    if tools:
        tools = list(tools)
        for i, t in enumerate(tools):
            _function_of(t, i)
        if msgs and msgs[0]["role"] in ("system", "developer"):
            msgs[0]["tools"] = tools
        else:
            msgs.insert(0, {"role": "system", "content": "", "tools": tools})
    msgs = _merge_tool_results(msgs)
    _order_tool_results(msgs)
    if any(m.get("tools") for m in msgs):
        drop_thinking = False
    if thinking and drop_thinking:
        msgs = _drop_old_reasoning(msgs)
    w = _Writer(special_tokens)
    if add_bos:
        w.format(BOS)
    for i in range(len(msgs)):
        _write_message(w, i, msgs, thinking, drop_thinking, think_max, add_generation_prompt)
    return ChatPrompt(w.text(), w.spans, special_tokens)


# ---------------------------------------------------------------- token ids


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """Ids of the format's special strings, read from ``tokenizer`` (never hard-coded).

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` (``token_to_id``) for DeepSeek-V4.

    Returns:
        ``{string: id}`` for BOS, EOS, ``<｜User｜>``, ``<｜Assistant｜>``, ``<think>``,
        ``</think>``, ``｜DSML｜``, ``<｜latest_reminder｜>`` and the task tokens.

    Raises:
        ValueError: one of them is not a single token of this tokenizer (not a DeepSeek-V4
            tokenizer); the message names the missing strings.
    """
    names = [BOS, EOS, USER, ASSISTANT, THINK_START, THINK_END, DSML, LATEST_REMINDER,
             *TASK_TOKENS.values()]
    ids = {s: tokenizer.token_to_id(s) for s in names}
    missing = [s for s, i in ids.items() if i is None]
    if missing:
        raise ValueError(
            f"the tokenizer has no token for {', '.join(missing)}: a DeepSeek-V4 tokenizer.json "
            "is needed for the chat format"
        )
    return {s: int(i) for s, i in ids.items()}


def encode_chat(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    mode: str = "chat",
    tools: Sequence[Any] | None = None,
    add_generation_prompt: bool = True,
    drop_thinking: bool = True,
    special_tokens: str = "escape",
) -> list[int]:
    """Token ids of a chat prompt: :func:`encode_messages`, then :meth:`ChatPrompt.token_ids`.

    Args:
        tokenizer: a DeepSeek-V4 ``tokenizers.Tokenizer`` (``dsv4.tokenizer.load_tokenizer``).
        messages, mode, tools, add_generation_prompt, drop_thinking, special_tokens: see
            :func:`encode_messages` (by default special-token text in content is escaped:
            encoded as ordinary text tokens, never as control ids).

    Returns:
        ``list[int]``; the first id is the tokenizer's BOS id, each special string the format
        writes is one id.

    Raises:
        ValueError: as :func:`encode_messages`, or the tokenizer lacks the special tokens
            (:func:`special_token_ids`).
    """
    ids_of = special_token_ids(tokenizer)
    prompt = encode_messages(messages, mode=mode, tools=tools,
                             add_generation_prompt=add_generation_prompt,
                             drop_thinking=drop_thinking, special_tokens=special_tokens)
    ids = prompt.token_ids(tokenizer)
    if not ids or ids[0] != ids_of[BOS]:  # pragma: no cover - guarded by special_token_ids
        raise ValueError("the tokenizer did not map the BOS string to its BOS id")
    return ids


# ---------------------------------------------------------------- parsing a completion


@dataclass
class ToolCall:
    """One parsed DSML tool call.

    Attributes:
        name: the invoked tool's name.
        arguments: a JSON object text, written as the release's decoder writes it
            (``{"key": value, ...}`` with ``", "`` / ``": "`` separators, non-ASCII kept).
    """

    name: str
    arguments: str

    def parsed_arguments(self) -> dict[str, Any]:
        """``json.loads(arguments)``."""
        return json.loads(self.arguments)

    def to_openai(self) -> dict[str, Any]:
        """``{"type": "function", "function": {"name": ..., "arguments": ...}}``."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedCompletion:
    """A generated assistant turn split into its parts (:func:`parse_completion`).

    Attributes:
        reasoning: text before ``</think>`` (thinking modes; ``""`` in chat mode).
        content: the answer text.
        tool_calls: parsed DSML calls, in order.
        reasoning_complete: ``</think>`` was seen (always ``True`` in chat mode). ``False`` means
            the completion stopped inside the reasoning (e.g. ``max_new_tokens``).
        ended: the text ended with EOS. Text from ``dsv4.generate.generate`` never holds the EOS
            token, so this is ``False`` there even when generation finished with EOS.
    """

    reasoning: str
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    reasoning_complete: bool = True
    ended: bool = False

    def to_message(self) -> dict[str, Any]:
        """An assistant message for the next :func:`encode_messages` call."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content,
                               "reasoning_content": self.reasoning}
        if self.tool_calls:
            msg["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        return msg


_INVOKE_RE = re.compile(r'<｜DSML｜invoke name="([^"\n]*)">\n')
_PARAM_RE = re.compile(r'<｜DSML｜parameter name="([^"\n]*)" string="(true|false)">')
_PARAM_CLOSE = f"</{DSML}parameter>"
_PARAM_CLOSE_JSON = "\\u003c" + _PARAM_CLOSE[1:]     # the same tag inside a JSON string
_INVOKE_CLOSE = f"</{DSML}invoke>"


def _parse_tool_calls(text: str, pos: int) -> tuple[list[ToolCall], int]:
    """Parse a DSML block starting at ``text[pos:]`` == ``<｜DSML｜tool_calls>\\n...``.

    Returns the calls and the index just after ``</｜DSML｜tool_calls>``.
    """
    def expect(s: str, at: int, what: str) -> int:
        if not text.startswith(s, at):
            got = text[at:at + len(s) + 10]
            raise ValueError(f"malformed DSML tool call block: expected {what} {s!r} at "
                             f"offset {at}, got {got!r}")
        return at + len(s)

    pos = expect(TOOL_CALLS_OPEN + "\n", pos, "the block opening")
    calls: list[ToolCall] = []
    while not text.startswith(TOOL_CALLS_CLOSE, pos):
        m = _INVOKE_RE.match(text, pos)
        if m is None:
            if pos >= len(text):
                raise ValueError("incomplete DSML tool call block: missing "
                                 f"{TOOL_CALLS_CLOSE!r}")
            raise ValueError(f"malformed DSML tool call block: expected an invoke or "
                             f"{TOOL_CALLS_CLOSE!r} at offset {pos}, got {text[pos:pos + 40]!r}")
        name, pos = m.group(1), m.end()
        fields: list[str] = []
        seen: set[str] = set()
        while True:
            p = _PARAM_RE.match(text, pos)
            if p is None:
                break
            key, is_str = p.group(1), p.group(2) == "true"
            end = text.find(_PARAM_CLOSE, p.end())
            if end < 0:
                raise ValueError(f"incomplete DSML parameter {key!r} of tool {name!r}")
            value = text[p.end():end]
            if key in seen:
                raise ValueError(f"duplicate DSML parameter {key!r} in a call of {name!r}")
            seen.add(key)
            if is_str:
                value_json = _to_json(value)
            else:
                try:
                    json.loads(value)
                except json.JSONDecodeError:
                    raise ValueError(f'DSML parameter {key!r} of {name!r} has string="false" but '
                                     f"its value is not JSON: {value!r}") from None
                except RecursionError:
                    raise ValueError(f"DSML parameter {key!r} of {name!r} is nested too deeply "
                                     "to be read as JSON") from None
                value_json = value
            fields.append(f"{_to_json(key)}: {value_json}")
            pos = expect("\n", end + len(_PARAM_CLOSE), "a newline after")
        if not fields and text.startswith("\n", pos):  # a call without parameters: empty line
            pos += 1
        pos = expect(_INVOKE_CLOSE + "\n", pos, "the end of the invoke")
        calls.append(ToolCall(name=name, arguments="{" + ", ".join(fields) + "}"))
    return calls, pos + len(TOOL_CALLS_CLOSE)


def _check_text(text: Any) -> None:
    if not isinstance(text, str):
        raise ValueError(f"completion text must be a str (decoded with special tokens kept), "
                         f"got {type(text).__name__}")


def parse_completion(text: str, mode: str = "chat") -> ParsedCompletion:
    """Split a generated assistant turn into reasoning, answer and tool calls.

    The release's ``parse_message_from_completion_text``, relaxed for a generation loop: the final
    EOS may be absent (``generate`` strips it) and, in thinking modes, a completion cut off before
    ``</think>`` is all reasoning (``reasoning_complete=False``) instead of an error.

    Args:
        text: the completion, i.e. the text after the prompt (which ended with ``<think>`` or
            ``</think>``), decoded with special tokens kept.
        mode: the mode the prompt was built with (:data:`MODES`).

    Returns:
        :class:`ParsedCompletion`.

    Raises:
        ValueError: unknown mode; ``text`` not a str; a DSML block before ``</think>``; a
            malformed or incomplete DSML block; text after the DSML block or after EOS; a special
            string (BOS, EOS, ``<think>``, ``</think>``, ``｜DSML｜``) inside the reasoning or the
            answer.
    """
    thinking, _ = _check_mode(mode)
    _check_text(text)
    reasoning, pos, reasoning_complete = "", 0, True
    if thinking:
        end = text.find(THINK_END)
        tool_at = text.find(TOOL_CALLS_MARKER)
        if 0 <= tool_at and (end < 0 or tool_at < end):
            raise ValueError("malformed completion: a DSML tool call block before </think>")
        if end < 0:
            eos = text.find(EOS)
            reasoning = text if eos < 0 else text[:eos]
            reasoning_complete = False
            pos = len(text) if eos < 0 else eos
        else:
            reasoning, pos = text[:end], end + len(THINK_END)

    content, calls = "", []
    if reasoning_complete:
        eos = text.find(EOS, pos)
        tool_at = text.find(TOOL_CALLS_MARKER, pos)
        if tool_at >= 0 and (eos < 0 or tool_at < eos):
            content = text[pos:tool_at]
            calls, pos = _parse_tool_calls(text, tool_at + 2)
        else:
            content = text[pos:] if eos < 0 else text[pos:eos]
            pos = len(text) if eos < 0 else eos
    ended = text.startswith(EOS, pos)
    if ended:
        pos += len(EOS)
    if pos != len(text):
        raise ValueError(f"malformed completion: unexpected text at the end: {text[pos:pos + 40]!r}")
    for s in (BOS, EOS, THINK_START, THINK_END, DSML):
        if s in content or s in reasoning:
            raise ValueError(f"malformed completion: special string {s!r} inside the "
                             f"{'answer' if s in content else 'reasoning'}")
    return ParsedCompletion(reasoning=reasoning, content=content, tool_calls=calls,
                            reasoning_complete=reasoning_complete, ended=ended)


class CompletionSplitter:
    """Streams a completion and tells which part each piece of text belongs to.

    Sections: ``"reasoning"`` (thinking modes, until ``</think>``), ``"answer"``, then
    ``"tool_calls"`` from a ``<｜DSML｜tool_calls`` that follows a blank line (the raw DSML text,
    starting at ``<｜DSML｜tool_calls``; the blank line before it is dropped, as in
    :func:`parse_completion`). ``</think>`` itself is not emitted. Text that might be the start of
    the next marker is held back until decided, so each piece lands in the right section whatever
    the chunking.

    Args:
        mode: the prompt's mode (:data:`MODES`); chat mode starts in ``"answer"``.

    Raises:
        ValueError: unknown mode.
    """

    def __init__(self, mode: str = "chat") -> None:
        thinking, _ = _check_mode(mode)
        self.section = "reasoning" if thinking else "answer"
        self._pending = ""

    def _marker(self) -> str | None:
        return {"reasoning": THINK_END, "answer": TOOL_CALLS_MARKER}.get(self.section)

    def push(self, text: str) -> list[tuple[str, str]]:
        """Add text; return ``[(section, text), ...]`` that is decided (possibly empty).
        Raises ValueError (holding what it held) for a ``text`` that is not a str."""
        _check_text(text)
        self._pending += text
        out: list[tuple[str, str]] = []
        while True:
            marker = self._marker()
            if marker is None:
                if self._pending:
                    out.append((self.section, self._pending))
                    self._pending = ""
                return out
            at = self._pending.find(marker)
            if at >= 0:
                if at > 0:
                    out.append((self.section, self._pending[:at]))
                if self.section == "reasoning":
                    self._pending = self._pending[at + len(marker):]
                    self.section = "answer"
                else:
                    self._pending = self._pending[at + 2:]  # keep "<｜DSML｜tool_calls"
                    self.section = "tool_calls"
                continue
            hold = 0
            for n in range(min(len(marker) - 1, len(self._pending)), 0, -1):
                if self._pending.endswith(marker[:n]):
                    hold = n
                    break
            cut = len(self._pending) - hold
            if cut > 0:
                out.append((self.section, self._pending[:cut]))
                self._pending = self._pending[cut:]
            return out

    def finish(self) -> list[tuple[str, str]]:
        """Release held-back text (it belongs to the current section)."""
        out = [(self.section, self._pending)] if self._pending else []
        self._pending = ""
        return out
