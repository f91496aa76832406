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

__all__ = [
    "ASSISTANT",
    "BOS",
    "DSML",
    "EOS",
    "LATEST_REMINDER",
    "MODES",
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


def _to_json(value: Any) -> str:
    """JSON text as the release writes it: ``json.dumps`` with non-ASCII kept, default separators."""
    return json.dumps(value, ensure_ascii=False)


def _check_mode(mode: str) -> tuple[bool, bool]:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(repr(m) for m in MODES)}, got {mode!r}")
    thinking_mode, think_max = MODES[mode]
    return thinking_mode == "thinking", think_max


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
    schemas = "\n".join(_to_json(dict(_function_of(t, i))) for i, t in enumerate(tools))
    return _TOOLS_PROMPT.replace("{schemas}", schemas)


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


def _render_parameters(arguments: Any, where: str) -> str:
    """DSML ``parameter`` lines of one call (release ``encode_arguments_to_dsml``).

    ``arguments`` is the OpenAI JSON string (or, as an extension, an already-parsed dict). Text that
    is not JSON becomes one string parameter named ``arguments``, as in the release.
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
        if not isinstance(args, dict):
            raise ValueError(f"{where} arguments must be a JSON object, got {arguments!r}")
    lines = []
    for key, value in args.items():
        is_str = isinstance(value, str)
        text = value if is_str else _to_json(value)
        lines.append(
            f'<{DSML}parameter name="{key}" string="{"true" if is_str else "false"}">{text}'
            f"</{DSML}parameter>"
        )
    return "\n".join(lines)


def _render_tool_calls(calls: Sequence[Any], where: str) -> str:
    invokes = []
    for j, call in enumerate(calls):
        name, arguments, _ = _call_name_and_args(call, f"{where}.tool_calls[{j}]")
        params = _render_parameters(arguments, f"{where}.tool_calls[{j}]")
        invokes.append(f'<{DSML}invoke name="{name}">\n{params}\n</{DSML}invoke>')
    return "\n\n" + TOOL_CALLS_OPEN + "\n" + "\n".join(invokes) + "\n" + TOOL_CALLS_CLOSE


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
        task = m.get("task")
        if task is not None and task not in TASK_TOKENS:
            raise ValueError(
                f"messages[{i}]['task'] must be one of {', '.join(TASK_TOKENS)}, got {task!r}"
            )
        if role == "developer" and not content:
            raise ValueError(f"messages[{i}]: a developer message needs non-empty content")
        out.append(copy.deepcopy(dict(m)))
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
                     "content": m.get("content") or ""}
            if prev_is_block_user:
                prev["content_blocks"].append(block)
            else:
                merged.append({"role": "user", "content_blocks": [block]})
        elif role == "user":
            block = {"type": "text", "text": m.get("content") or ""}
            if prev_is_block_user and prev.get("task") is None:
                prev["content_blocks"].append(block)
            else:
                new = {"role": "user", "content": m.get("content") or "", "content_blocks": [block]}
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


def _render_user_blocks(blocks: Sequence[Mapping[str, Any]]) -> str:
    parts = []
    for b in blocks:
        kind = b.get("type")
        if kind == "text":
            parts.append(b.get("text", ""))
        elif kind == "tool_result":
            parts.append(TOOL_RESULT_OPEN + str(b.get("content", "")) + TOOL_RESULT_CLOSE)
        else:
            parts.append(f"[Unsupported {kind}]")
    return "\n\n".join(parts)


def _render_message(i: int, messages: Sequence[Mapping[str, Any]], thinking: bool,
                    drop_thinking: bool, think_max: bool, generation_prompt: bool) -> str:
    """One message plus the transition that follows it (release ``render_message``)."""
    m = messages[i]
    role = m["role"]
    content = m.get("content") or ""
    last_user = _last_user_index(messages)
    out = THINK_MAX_PROMPT if (i == 0 and thinking and think_max) else ""

    if role in ("system", "developer"):
        text = content if role == "system" else USER + content
        if m.get("tools"):
            text += "\n\n" + render_tools(m["tools"])
        if m.get("response_format"):
            text += "\n\n" + _RESPONSE_FORMAT_PROMPT.format(schema=_to_json(m["response_format"]))
        out += text
    elif role == "user":
        blocks = m.get("content_blocks")
        out += USER + (_render_user_blocks(blocks) if blocks else content)
    elif role == "latest_reminder":
        out += LATEST_REMINDER + content
    elif role == "assistant":
        reasoning = ""
        prev_task = i > 0 and messages[i - 1].get("task") is not None
        if thinking and not prev_task and (not drop_thinking or i > last_user):
            reasoning = (m.get("reasoning_content") or "") + THINK_END
        calls = _render_tool_calls(m["tool_calls"], f"messages[{i}]") if m.get("tool_calls") else ""
        out += reasoning + content + calls + ("" if m.get("wo_eos") else EOS)
    else:  # pragma: no cover - tool messages were merged, roles were checked
        raise ValueError(f"unexpected role {role!r}")

    # The transition: only after the last message, or before an assistant/latest_reminder turn.
    if i + 1 < len(messages) and messages[i + 1]["role"] not in ("assistant", "latest_reminder"):
        return out
    task = m.get("task")
    if task is not None:
        if task == "action":
            out += ASSISTANT + (THINK_START if thinking else THINK_END) + TASK_TOKENS[task]
        else:
            out += TASK_TOKENS[task]
    elif role in _USER_LIKE:
        if i == len(messages) - 1 and not generation_prompt:
            return out
        opens_thinking = thinking and (not drop_thinking or i >= last_user)
        out += ASSISTANT + (THINK_START if opens_thinking else THINK_END)
    return out


def encode_messages(
    messages: Sequence[Mapping[str, Any]],
    mode: str = "chat",
    tools: Sequence[Any] | None = None,
    add_generation_prompt: bool = True,
    drop_thinking: bool = True,
    add_bos: bool = True,
) -> str:
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

    Returns:
        The prompt text; tokenise it with ``add_special_tokens=False`` (:func:`encode_chat`).

    Raises:
        ValueError: unknown mode or role, non-string content, an empty developer message, an
            unknown task, malformed tools or tool calls.
    """
    thinking, think_max = _check_mode(mode)
    msgs = _check_messages(messages)
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
    parts = [BOS] if add_bos else []
    parts += [
        _render_message(i, msgs, thinking, drop_thinking, think_max, add_generation_prompt)
        for i in range(len(msgs))
    ]
    return "".join(parts)


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
) -> list[int]:
    """Token ids of a chat prompt: :func:`encode_messages` tokenised without added specials.

    Args:
        tokenizer: a DeepSeek-V4 ``tokenizers.Tokenizer`` (``dsv4.tokenizer.load_tokenizer``).
        messages, mode, tools, add_generation_prompt, drop_thinking: see :func:`encode_messages`.

    Returns:
        ``list[int]``; the first id is the tokenizer's BOS id, each special string is one id.

    Raises:
        ValueError: as :func:`encode_messages`, or the tokenizer lacks the special tokens
            (:func:`special_token_ids`).
    """
    ids_of = special_token_ids(tokenizer)
    text = encode_messages(messages, mode=mode, tools=tools,
                           add_generation_prompt=add_generation_prompt, drop_thinking=drop_thinking)
    ids = list(tokenizer.encode(text, add_special_tokens=False).ids)
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
                value_json = value
            fields.append(f"{_to_json(key)}: {value_json}")
            pos = expect("\n", end + len(_PARAM_CLOSE), "a newline after")
        if not fields and text.startswith("\n", pos):  # a call without parameters: empty line
            pos += 1
        pos = expect(_INVOKE_CLOSE + "\n", pos, "the end of the invoke")
        calls.append(ToolCall(name=name, arguments="{" + ", ".join(fields) + "}"))
    return calls, pos + len(TOOL_CALLS_CLOSE)


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
        ValueError: unknown mode; a DSML block before ``</think>``; a malformed or incomplete DSML
            block; text after the DSML block or after EOS; a special string (BOS, EOS, ``<think>``,
            ``</think>``, ``｜DSML｜``) inside the reasoning or the answer.
    """
    thinking, _ = _check_mode(mode)
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
        """Add text; return ``[(section, text), ...]`` that is decided (possibly empty)."""
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
