"""The chat dialect: a Chat Completions hub (POST {hub}/chat/completions).

Going out, a turn becomes one Chat Completions request: a system message from the current
request's ``instructions`` only (never an earlier turn's), then the history, the items a bootstrap
service injected and the caller's input, oldest first. Consecutive function calls become ONE
assistant message with ``tool_calls`` (hubs reject one assistant message per call), and reasoning
items are not replayed. The model is offered functions (:class:`ChatToolset`): the function
tools, each custom tool as a function taking its free text as one string argument (``input``),
and the function and custom tools of each namespace, flattened (under their own names, or
``<namespace>__<name>`` when that name is taken). The web search tools are not offered and are
reported (``respgw_router_tools_not_run_total``), and so are the stateful ``code_interpreter`` and
``shell`` when no execution service runs them: when one does, the tool loop
(:mod:`router_svc.tool_loop`) offers them itself and leaves them out of the request it translates
here. A prompt template or a tool nobody would run is refused (:func:`validate.check_chat_hub`). Request fields a chat hub has no use for (store, metadata,
truncation, service_tier, prompt_cache_key, ...) are dropped from the hub request, as
OpenAI-compatible servers do, and still echoed on the response; the hub's own sampling parameters
(penalties, seed, vLLM's extras) reach it as given, and top-level fields the gateway does not know
reach no hub.

Coming back, a chat completion becomes output items in OpenAI's shapes: a reasoning item (when the
hub returned ``reasoning_content``), a message (``msg_``), then one item per tool call: a
``function_call`` (``fc_``, with its ``namespace`` for a namespace's function) or, for a custom
tool, a ``custom_tool_call`` (``ctc_``) whose ``input`` is the call's one argument; with usage in
Responses terms.

Streamed, its chunks become Responses events as they come (:class:`ChatStreamTranslator`, on
:class:`router_svc.events.Translator`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import orjson
from prometheus_client import Counter

from router_svc import errors, hub_shape, validate
from router_svc.events import Translator, ended_early
from router_svc.ids import new_id
from router_svc.inputs import output_text
from router_svc.response import (
    NO_RESOURCES,
    error_object,
    function_call_item,
    message_item,
    reasoning_item,
    response_object,
)
from router_svc.validate import TurnRequest
from router_svc.vocabulary import HUB_SAMPLING_FIELDS

log = logging.getLogger(__name__)

TOOLS_NOT_RUN = Counter(
    "respgw_router_tools_not_run_total",
    "Requests to a Chat Completions hub that declared a tool the model was not offered (web "
    "search, and the stateful tools a chat model cannot call), by tool type.",
    ["type"],
)
_not_run_logged: set[str] = set()


LOGPROBS_INCLUDE = "message.output_text.logprobs"

_CHAT_IMAGE_DETAILS = ("auto", "low", "high")
# The items that answer a call.
_CALL_OUTPUTS = frozenset({"function_call_output", "custom_tool_call_output"})

# finish_reason values that say the hub stopped without finishing the answer: vLLM and SGLang end an
# aborted request's stream (engine shutdown, preemption, an abort) with "abort", then [DONE].
_ABORTED = frozenset({"abort", "error"})


# --- out: Chat Completions -------------------------------------------------------------------


def chat_request(
    req: TurnRequest,
    history: list[dict[str, Any]],
    injected: list[dict[str, Any]],
    *,
    stream: bool,
) -> dict[str, Any]:
    """The body for POST {hub}/chat/completions.

    The outputs the input opens with answer the calls at the end of the history, so they go
    right after it, ahead of the injected items: a chat hub wants a tool call answered by the
    very next messages."""
    body = req.body
    _report_not_run(validate.check_chat_hub(req))
    toolset = ChatToolset(req.tools)
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    items = req.input_items
    if injected:
        answers = 0
        while answers < len(items) and items[answers].get("type") in _CALL_OUTPUTS:
            answers += 1
        ordered = [*history, *items[:answers], *injected, *items[answers:]]
    else:
        ordered = [*history, *items]
    messages.extend(chat_messages(ordered, toolset))
    out: dict[str, Any] = {"model": req.model, "messages": messages}

    tools = toolset.chat_tools()
    choice, allowed = _chat_tool_choice(body.get("tool_choice"), toolset)
    if allowed is not None:
        tools = [t for t in tools if t["function"]["name"] in allowed]
    if tools:
        out["tools"] = tools
        if choice is not None:
            out["tool_choice"] = choice
        if body.get("parallel_tool_calls") is not None:
            out["parallel_tool_calls"] = body["parallel_tool_calls"]

    for key in ("temperature", "top_p", "user", *sorted(HUB_SAMPLING_FIELDS)):
        if body.get(key) is not None:
            out[key] = body[key]
    if body.get("max_output_tokens") is not None:
        out["max_tokens"] = body["max_output_tokens"]
    top_logprobs = body.get("top_logprobs") or 0
    if top_logprobs or LOGPROBS_INCLUDE in req.include:
        out["logprobs"] = True
        if top_logprobs:
            out["top_logprobs"] = top_logprobs
    response_format = _response_format((body.get("text") or {}).get("format"))
    if response_format is not None:
        out["response_format"] = response_format
    effort = (body.get("reasoning") or {}).get("effort")
    if effort is not None:
        out["reasoning_effort"] = effort
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


def _report_not_run(kinds: list[str]) -> None:
    """Counts the declared tools a chat model is not offered; logs each type once a process."""
    for kind in kinds:
        TOOLS_NOT_RUN.labels(kind).inc()
        if kind not in _not_run_logged:
            _not_run_logged.add(kind)
            log.warning(
                "a declared tool is not offered to the Chat Completions model (nothing here "
                "runs it); the model answers without it",
                extra={"tool_type": kind},
            )


def chat_messages(
    items: Iterable[Mapping[str, Any]], toolset: ChatToolset | None = None
) -> list[dict[str, Any]]:
    """Responses items, oldest first, as Chat Completions messages; a call is named as
    ``toolset`` offers its tool (a namespace's function may be offered under a longer name)."""
    messages: list[dict[str, Any]] = []
    reasoning: tuple[int, str] | None = None  # an opened reasoning text, and where it goes
    for item in items:
        kind = item.get("type") or ("message" if "role" in item else None)
        if reasoning is not None and len(messages) > reasoning[0]:
            _give_reasoning(messages[reasoning[0]], reasoning[1])
            reasoning = None
        if kind == OPENED_REASONING:
            reasoning = (len(messages), str(item.get("text", "")))
        elif kind == "message":
            messages.append(_chat_message(item))
        elif kind in ("function_call", "custom_tool_call"):
            if kind == "function_call":
                arguments = item.get("arguments") or ""
            else:
                # A custom tool's input is free text; chat templates expect JSON arguments.
                arguments = orjson.dumps({"input": item.get("input") or ""}).decode()
            name = str(item.get("name", ""))
            if toolset is not None:
                name = toolset.chat_name(name, item.get("namespace"))
            call = {
                "id": item.get("call_id", ""),
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
            last = messages[-1] if messages else None
            # A call joins the assistant message right before it: the text and the calls of one
            # model turn (and parallel calls) go back as the one message the model produced.
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind in ("function_call_output", "custom_tool_call_output"):
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": item.get("call_id", ""),
                    "content": _tool_content(item.get("output", "")),
                }
            )
        # Anything else (reasoning, built-in tool calls) has no Chat Completions form: stored
        # reasoning is not replayed to a chat hub, and the chat model never called those tools.
    if reasoning is not None and len(messages) > reasoning[0]:
        _give_reasoning(messages[reasoning[0]], reasoning[1])
    return messages


# A reasoning text the gateway sealed for a store: false client and got back in its input
# (router_svc.compaction): it goes to a chat hub as the reasoning_content of the assistant
# message that followed it, the field vLLM, SGLang and llama.cpp take (the chat template decides
# whether the model sees it).
OPENED_REASONING = "respgw.opened_reasoning"


def _give_reasoning(message: dict[str, Any], text: str) -> None:
    if message["role"] == "assistant" and text:
        message["reasoning_content"] = text


def _chat_message(item: Mapping[str, Any]) -> dict[str, Any]:
    role = item.get("role", "user")
    content = item.get("content", "")
    parts: list[Any] = [content] if isinstance(content, str) else list(content or [])
    if role == "assistant":
        texts: list[str] = []
        refusals: list[str] = []
        for part in parts:
            if isinstance(part, str):
                texts.append(part)
            elif part.get("type") == "refusal":
                refusals.append(part.get("refusal", ""))
            else:
                texts.append(part.get("text", ""))
        message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
        if refusals:
            message["refusal"] = "".join(refusals)
        return message
    chat_parts = [_chat_part(part) for part in parts]
    if role in ("system", "developer"):
        # System messages are plain text on every hub.
        return {"role": "system", "content": "\n".join(p.get("text", "") for p in chat_parts)}
    if len(chat_parts) == 1 and chat_parts[0]["type"] == "text":
        return {"role": "user", "content": chat_parts[0]["text"]}
    return {"role": "user", "content": chat_parts}


def _chat_part(part: Any) -> dict[str, Any]:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text"):
        return {"type": "text", "text": part.get("text", "")}
    if kind == "input_image":
        url = part.get("image_url")
        if not url:
            raise errors.InvalidRequest(
                "An input_image given only by file_id cannot be sent to this model server: give "
                "its image_url (a URL or a data URL) instead.",
                param="input",
                code="unsupported_value",
            )
        image: dict[str, Any] = {"url": url}
        if part.get("detail") in _CHAT_IMAGE_DETAILS:
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind == "input_file":
        file = {k: part[k] for k in ("file_data", "file_id", "filename") if part.get(k) is not None}
        if "file_data" not in file and "file_id" not in file:
            raise errors.InvalidRequest(
                "An input_file given only by file_url cannot be sent to this model server: give "
                "its file_data instead.",
                param="input",
                code="unsupported_value",
            )
        return {"type": "file", "file": file}
    if kind == "refusal":
        return {"type": "text", "text": part.get("refusal", "")}
    raise errors.InvalidRequest(
        f"Content of type '{kind}' cannot be sent to this model server.",
        param="input",
        code="unsupported_value",
    )


def _tool_content(output: Any) -> str | list[dict[str, Any]]:
    if isinstance(output, str):
        return output
    parts = [_chat_part(part) for part in output or []]
    if all(p["type"] == "text" for p in parts):
        return "\n".join(p["text"] for p in parts)
    return parts


# The one argument of a custom tool offered as a function: its free-text input.
CUSTOM_TOOL_PARAMETERS: Mapping[str, Any] = MappingProxyType(
    {
        "type": "object",
        "properties": {"input": {"type": "string", "description": "The input of the tool."}},
        "required": ["input"],
        "additionalProperties": False,
    }
)


@dataclass(frozen=True)
class ChatFunction:
    """A tool the chat hub is offered as a function, and what a call to it is in Responses terms."""

    chat_name: str
    kind: str  # "function" or "custom"
    name: str
    namespace: str | None
    tool: Mapping[str, Any]

    def chat_tool(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.chat_name}
        if self.kind == "custom":
            description = _custom_description(self.tool)
            if description:
                function["description"] = description
            function["parameters"] = dict(CUSTOM_TOOL_PARAMETERS)
        else:
            for key in ("description", "parameters", "strict"):
                if self.tool.get(key) is not None:
                    function[key] = self.tool[key]
        return {"type": "function", "function": function}


def _custom_description(tool: Mapping[str, Any]) -> str:
    text = str(tool.get("description") or "")
    fmt = tool.get("format")
    if isinstance(fmt, Mapping) and fmt.get("type") == "grammar" and fmt.get("definition"):
        rule = f"The input must follow this {fmt.get('syntax') or ''} grammar:\n{fmt['definition']}"
        text = f"{text}\n\n{rule}" if text else rule
    return text


class ChatToolset:
    """The declared tools a chat hub is offered, as functions, by the names the hub knows.

    Function and custom tools keep their names; a namespace's tools are flattened into the list,
    each under its own name unless another tool has it, then as ``<namespace>__<name>``. Other
    tool types are not offered (:func:`validate.check_chat_hub` refuses or reports them).
    """

    def __init__(self, tools: Iterable[Mapping[str, Any]]) -> None:
        tools = list(tools)
        taken = {str(t.get("name")) for t in tools if t.get("type") in ("function", "custom")}
        self.functions: list[ChatFunction] = []
        self._by_chat_name: dict[str, ChatFunction] = {}
        self._chat_names: dict[tuple[str, str | None], str] = {}
        for tool in tools:
            kind = tool.get("type")
            if kind in ("function", "custom"):
                self._add(str(tool.get("name")), None, tool)
            elif kind == "namespace":
                namespace = str(tool.get("name"))
                for member in tool.get("tools") or []:
                    name = str(member.get("name"))
                    chat_name = name if name not in taken else f"{namespace}__{name}"
                    suffix = 2
                    while chat_name in taken:
                        chat_name = f"{namespace}__{name}_{suffix}"
                        suffix += 1
                    taken.add(chat_name)
                    self._add(name, namespace, member, chat_name)

    def _add(
        self, name: str, namespace: str | None, tool: Mapping[str, Any], chat_name: str = ""
    ) -> None:
        chat_name = chat_name or name
        if chat_name in self._by_chat_name:  # a name declared twice: the first one is offered
            return
        function = ChatFunction(chat_name, str(tool.get("type")), name, namespace, tool)
        self.functions.append(function)
        self._by_chat_name[chat_name] = function
        self._chat_names.setdefault((name, namespace), chat_name)

    def chat_tools(self) -> list[dict[str, Any]]:
        """The Chat Completions ``tools``."""
        return [f.chat_tool() for f in self.functions]

    def chat_name(self, name: str, namespace: object = None) -> str:
        """The name the hub knows a tool by (its own name when it is not declared now)."""
        key = (name, namespace if isinstance(namespace, str) else None)
        return self._chat_names.get(key, name)

    def find(self, chat_name: str) -> ChatFunction | None:
        """The tool the hub called by this name, if it was offered."""
        return self._by_chat_name.get(chat_name)

    def call_item(
        self,
        *,
        call_id: str,
        chat_name: str,
        arguments: str,
        status: str = "completed",
        item_id: str | None = None,
    ) -> dict[str, Any]:
        """A chat tool call as the Responses item it is: a ``function_call`` (with the
        ``namespace`` of a namespace's function), or a ``custom_tool_call`` whose ``input`` is
        the call's one argument (the raw arguments when the hub did not send that)."""
        function = self.find(chat_name)
        if function is None:
            return function_call_item(
                call_id=call_id, name=chat_name, arguments=arguments, status=status, item_id=item_id
            )
        if function.kind == "custom":
            item: dict[str, Any] = {
                "id": item_id or new_id("ctc"),
                "type": "custom_tool_call",
                "status": status,
                "call_id": call_id,
                "input": custom_input(arguments),
                "name": function.name,
            }
        else:
            item = function_call_item(
                call_id=call_id,
                name=function.name,
                arguments=arguments,
                status=status,
                item_id=item_id,
            )
        if function.namespace is not None:
            item["namespace"] = function.namespace
        return item


def custom_input(arguments: str) -> str:
    """A custom tool's input from the arguments of the function it was offered as."""
    try:
        parsed = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return arguments
    value = parsed.get("input") if isinstance(parsed, dict) else None
    return value if isinstance(value, str) else arguments


def chat_tools(tools: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The tools as Chat Completions tools (:class:`ChatToolset`); other tool types are left
    out."""
    return ChatToolset(tools).chat_tools()


def _chat_tool_choice(
    choice: Any, toolset: ChatToolset
) -> tuple[str | dict[str, Any] | None, set[str] | None]:
    """The chat tool_choice, and the tool names to offer when the choice restricts them."""
    if choice is None or isinstance(choice, str):
        return choice, None
    kind = choice.get("type")
    if kind in ("function", "custom"):
        wanted = _chosen(toolset, kind, choice.get("name"))
        if wanted is not None:
            return {"type": "function", "function": {"name": wanted}}, None
        return None, None
    if kind == "allowed_tools":
        # Offering only the allowed functions works on every hub, unlike chat's allowed_tools.
        allowed = {
            _chosen(toolset, t.get("type"), t.get("name")) for t in choice.get("tools") or []
        }
        return choice.get("mode", "auto"), {n for n in allowed if n is not None}
    # A built-in tool the chat hub is not given cannot be forced.
    return None, None


def _chosen(toolset: ChatToolset, kind: object, name: object) -> str | None:
    """The chat name of the function or custom tool ``name`` (a namespace's one included)."""
    if kind not in ("function", "custom") or not isinstance(name, str):
        return None
    for function in toolset.functions:
        if function.kind == kind and function.name == name:
            return function.chat_name
    return None


def _response_format(fmt: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not fmt or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    schema: dict[str, Any] = {"name": fmt.get("name"), "schema": fmt.get("schema")}
    for key in ("description", "strict"):
        if fmt.get(key) is not None:
            schema[key] = fmt[key]
    return {"type": "json_schema", "json_schema": schema}


def chat_logprobs(content: Any) -> list[dict[str, Any]]:
    """Chat ``logprobs.content`` entries as ``output_text`` logprobs."""
    out: list[dict[str, Any]] = []
    for entry in content or []:
        if not isinstance(entry, dict):
            continue
        out.append(
            {
                "token": entry.get("token", ""),
                "bytes": entry.get("bytes") or [],
                "logprob": entry.get("logprob", 0.0),
                "top_logprobs": [
                    {
                        "token": top.get("token", ""),
                        "bytes": top.get("bytes") or [],
                        "logprob": top.get("logprob", 0.0),
                    }
                    for top in entry.get("top_logprobs") or []
                    if isinstance(top, dict)
                ],
            }
        )
    return out


def chat_reasoning(source: Mapping[str, Any]) -> str:
    """The reasoning text of a chat message or delta (vLLM: reasoning_content, later reasoning)."""
    text = source.get("reasoning_content") or source.get("reasoning")
    return text if isinstance(text, str) else ""


# Why a chat completion stopped -> the Response's status and incomplete_details.
INCOMPLETE_REASONS = {"length": "max_output_tokens", "content_filter": "content_filter"}


# --- back: Chat Completions ------------------------------------------------------------------


def usage_from_chat(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """Chat usage in Responses terms, with the detail counts always present (0 when unknown)."""
    if not isinstance(usage, dict):
        return None
    prompt = _count(usage.get("prompt_tokens"))
    completion = _count(usage.get("completion_tokens"))
    total = usage.get("total_tokens")
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    return {
        "input_tokens": prompt,
        "input_tokens_details": {
            "cached_tokens": _count(prompt_details.get("cached_tokens")),
            "cache_write_tokens": 0,
        },
        "output_tokens": completion,
        "output_tokens_details": {
            "reasoning_tokens": _count(completion_details.get("reasoning_tokens"))
        },
        "total_tokens": _count(total) if total is not None else prompt + completion,
    }


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def from_chat_completion(
    req: TurnRequest,
    completion: dict[str, Any],
    *,
    response_id: str,
    created_at: int,
    tool_resources: Mapping[str, str] = NO_RESOURCES,
) -> dict[str, Any]:
    """A chat completion from the hub as our Response object."""
    if not isinstance(completion, dict):
        raise errors.UpstreamError(
            "The model server's answer is not a JSON object.", code=hub_shape.MALFORMED
        )
    hub_shape.check_completion(completion)
    choices = completion["choices"]
    if not choices:
        raise errors.UpstreamError(
            "The model server returned a chat completion without choices.",
            code=hub_shape.MALFORMED,
        )
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict):
        raise errors.UpstreamError(
            "The model server returned a choice without a message.", code=hub_shape.MALFORMED
        )

    output: list[dict[str, Any]] = []
    reasoning = chat_reasoning(message)
    if reasoning:
        output.append(reasoning_item(reasoning))
    parts: list[dict[str, Any]] = []
    content = message.get("content")
    if isinstance(content, list):  # a few hubs answer with content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if isinstance(content, str) and content:
        part = output_text(content)
        if LOGPROBS_INCLUDE in req.include:
            part["logprobs"] = chat_logprobs((choice.get("logprobs") or {}).get("content"))
        parts.append(part)
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:
        parts.append({"type": "refusal", "refusal": refusal})
    if parts:
        output.append(message_item(parts))
    toolset = ChatToolset(req.tools)
    for call in message.get("tool_calls") or []:
        if not isinstance(call, dict):
            continue
        function = call.get("function") or {}
        output.append(
            toolset.call_item(
                call_id=call.get("id") or new_id("call"),
                chat_name=function.get("name") or "",
                arguments=function.get("arguments") or "",
            )
        )

    status, details = "completed", None
    reason = INCOMPLETE_REASONS.get(choice.get("finish_reason") or "")
    if reason is not None:
        status, details = "incomplete", {"reason": reason}
        if output:
            # The item being generated when the limit hit is the one cut short.
            output[-1]["status"] = "incomplete"
    return response_object(
        req,
        response_id=response_id,
        created_at=created_at,
        status=status,
        output=output,
        usage=usage_from_chat(completion.get("usage")),
        incomplete_details=details,
        tool_resources=tool_resources,
    )


# --- streaming: chunks -> Responses events ----------------------------------------------


class _Text:
    """Text that arrives in pieces. A str object costs 49 bytes more than its text, so a piece per
    few-byte delta would cost many times the answer: pieces are joined into blocks of
    :data:`_BLOCK` as they come, and into one string when read."""

    __slots__ = ("_blocks", "_pieces")

    def __init__(self) -> None:
        self._blocks: list[str] = []
        self._pieces: list[str] = []

    def append(self, piece: str) -> None:
        self._pieces.append(piece)
        if len(self._pieces) >= _BLOCK:
            self._blocks.append("".join(self._pieces))
            self._pieces.clear()

    def value(self) -> str:
        if self._pieces or len(self._blocks) != 1:
            # Kept as the one block, so that the text is not held twice.
            self._blocks = ["".join([*self._blocks, *self._pieces])]
            self._pieces.clear()
        return self._blocks[0]


_BLOCK = 256


@dataclass
class _Part:
    """An open content part; its text is kept in pieces and joined when read."""

    data: dict[str, Any]  # the part inside its item's "content"
    key: str  # "text" or "refusal"
    pieces: _Text = field(default_factory=_Text)

    def render(self) -> None:
        self.data[self.key] = self.pieces.value()


@dataclass
class _Item:
    """An output item being streamed."""

    index: int
    data: dict[str, Any]  # the item inside the response's output
    parts: list[_Part] = field(default_factory=list)
    arguments: _Text = field(default_factory=_Text)
    call: _Call | None = None  # the chat tool call a function_call item streams

    def render(self) -> None:
        for part in self.parts:
            part.render()
        if self.data["type"] == "function_call":
            self.data["arguments"] = self.arguments.value()
        elif self.data["type"] == "custom_tool_call":
            self.data["input"] = custom_input(self.arguments.value())


@dataclass
class _Call:
    """A tool call of the chat stream, by its chunk index; added once its name is known."""

    call_id: str = ""
    name: str = ""
    pending: list[str] = field(default_factory=list)
    item: _Item | None = None
    closed: bool = False


class ChatStreamTranslator(Translator):
    """Turns the chunks of one streamed chat completion into Responses streaming events."""

    def __init__(
        self,
        req: TurnRequest,
        *,
        response_id: str,
        created_at: int,
        tool_resources: Mapping[str, str] = NO_RESOURCES,
    ) -> None:
        super().__init__(
            req, response_id=response_id, created_at=created_at, tool_resources=tool_resources
        )
        self._output: list[dict[str, Any]] = []
        # The names the hub knows the declared tools by (namespace functions, custom tools).
        self._toolset = ChatToolset(req.tools)
        self._open: list[_Item] = []  # the item being streamed (a call joins once named)
        self._calls: dict[int, _Call] = {}
        self._last_call: int | None = None
        self._finish_reason: str | None = None
        self._usage: dict[str, Any] | None = None
        self._logprobs = LOGPROBS_INCLUDE in req.include
        # Seals a reasoning item's text into its encrypted_content when the item is done (set by
        # the turn when the client asked for reasoning.encrypted_content); None: no sealing.
        self.seal_reasoning: Callable[[str], str] | None = None

    # -- the Response object

    def _response(self, status: str, **extra: Any) -> dict[str, Any]:
        return response_object(
            self._req,
            response_id=self._id,
            created_at=self._created_at,
            status=status,
            output=self._output,
            usage=self._usage,
            tool_resources=self._resources,
            **extra,
        )

    @property
    def response(self) -> dict[str, Any]:
        """The Response object as it stands; final once finish() or fail() ran."""
        if self._final is not None:
            return self._final
        for item in self._open:
            item.render()
        return self._response("in_progress")

    # -- lifecycle

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        """The events for one parsed ``chat.completion.chunk``."""
        if self._final is not None:
            return []
        hub_shape.check_chunk(chunk)
        events = self.start()
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._usage = usage_from_chat(usage)
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            reasoning = chat_reasoning(delta)
            if reasoning:
                events += self._part_delta("reasoning", "reasoning_text", reasoning, None)
            content = delta.get("content")
            if isinstance(content, str) and content:
                logprobs = None
                if self._logprobs:
                    logprobs = chat_logprobs((choice.get("logprobs") or {}).get("content"))
                events += self._part_delta("message", "output_text", content, logprobs)
            refusal = delta.get("refusal")
            if isinstance(refusal, str) and refusal:
                events += self._part_delta("message", "refusal", refusal, None)
            for call in delta.get("tool_calls") or []:
                if isinstance(call, dict):
                    events += self._call_delta(call)
            finish_reason = choice.get("finish_reason")
            if isinstance(finish_reason, str) and finish_reason:
                self._finish_reason = finish_reason
        return events

    def finish(self) -> list[dict[str, Any]]:
        """The hub's stream ended: closes the open items, then ``response.completed`` (any
        finish_reason that says the answer is whole: stop, tool_calls, ...) or
        ``response.incomplete`` (length, content_filter).

        Raises :class:`errors.UpstreamError` (code :data:`STREAM_INCOMPLETE`) when the hub never
        sent a finish_reason, or sent one that says it gave up (abort, error); the caller then
        answers :meth:`fail`.
        """
        if self._final is not None:
            return []
        if not self._finish_reason:
            raise ended_early("no finish_reason")
        if self._finish_reason in _ABORTED:
            raise ended_early(f"finish_reason {self._finish_reason!r}")
        events = self.start()
        reason = INCOMPLETE_REASONS.get(self._finish_reason)
        events += self._close_all(last_status="incomplete" if reason else "completed")
        if reason is None:
            self._final = self._response("completed")
            events.append(self._events.make("response.completed", response=self._final))
        else:
            self._final = self._response("incomplete", incomplete_details={"reason": reason})
            events.append(self._events.make("response.incomplete", response=self._final))
        return events

    def fail(self, code: str, message: str) -> list[dict[str, Any]]:
        """An ``error`` event and ``response.failed``; open items stay open, as incomplete."""
        if self._final is not None:
            return []
        events = self.start()
        for call in self._calls.values():
            if call.item is None and not call.closed:
                events += self._add_call(call)
        for item in self._open:
            item.render()
            item.data["status"] = "incomplete"
        self._open = []
        self._final = self._response("failed", error=error_object(code, message))
        events.append(self._events.make("error", code=code, message=message, param=None))
        events.append(self._events.make("response.failed", response=self._final))
        return events

    # -- compaction (router_svc.compaction), before the hub is called

    def open_compaction(self, item_id: str) -> list[dict[str, Any]]:
        """A compaction item is being made: ``response.output_item.added`` and
        ``response.compaction.compacting``."""
        events = self.start()
        index = len(self._output)
        item = {"id": item_id, "type": "compaction", "encrypted_content": ""}
        self._output.append(item)
        events.append(
            self._events.make("response.output_item.added", output_index=index, item=dict(item))
        )
        events.append(
            self._events.make("response.compaction.compacting", item_id=item_id, output_index=index)
        )
        return events

    def close_compaction(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        """The compaction item is made: ``response.output_item.done``."""
        index = next(i for i, data in enumerate(self._output) if data.get("id") == item["id"])
        self._output[index] = item
        return [self._events.make("response.output_item.done", output_index=index, item=dict(item))]

    # -- items

    def _add(self, data: dict[str, Any]) -> tuple[_Item, dict[str, Any]]:
        item = _Item(index=len(self._output), data=data)
        self._output.append(data)
        self._open.append(item)
        event = self._events.make(
            "response.output_item.added", output_index=item.index, item=copy.deepcopy(data)
        )
        return item, event

    def _close_all(self, *, last_status: str = "completed") -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for call in self._calls.values():
            if call.item is None and not call.closed:
                events += self._add_call(call)
        last = len(self._output) - 1
        for item in list(self._open):
            status = last_status if item.index == last else "completed"
            events += self._close(item, status)
        return events

    def _close(self, item: _Item, status: str) -> list[dict[str, Any]]:
        self._open.remove(item)
        if item.call is not None:
            item.call.closed = True
        item.render()
        events: list[dict[str, Any]] = []
        data = item.data
        if data["type"] == "function_call":
            events.append(
                self._events.make(
                    "response.function_call_arguments.done",
                    item_id=data["id"],
                    output_index=item.index,
                    name=data["name"],
                    arguments=data["arguments"],
                )
            )
        elif data["type"] == "custom_tool_call":
            # The hub streams a JSON object around the input: it goes out whole, once decoded.
            common = {"item_id": data["id"], "output_index": item.index}
            events.append(
                self._events.make(
                    "response.custom_tool_call_input.delta", **common, delta=data["input"]
                )
            )
            events.append(
                self._events.make(
                    "response.custom_tool_call_input.done", **common, input=data["input"]
                )
            )
        elif item.parts:
            events += self._close_part(item, len(item.parts) - 1)
        if data["type"] == "reasoning" and self.seal_reasoning is not None:
            _seal(data, self.seal_reasoning)
        data["status"] = status
        events.append(
            self._events.make(
                "response.output_item.done", output_index=item.index, item=copy.deepcopy(data)
            )
        )
        return events

    def _close_part(self, item: _Item, content_index: int) -> list[dict[str, Any]]:
        part = item.parts[content_index]
        part.render()
        common = {"item_id": item.data["id"], "output_index": item.index}
        kind = part.data["type"]
        if kind == "output_text":
            done = self._events.make(
                "response.output_text.done",
                **common,
                content_index=content_index,
                text=part.data["text"],
                logprobs=list(part.data["logprobs"]),
            )
        elif kind == "refusal":
            done = self._events.make(
                "response.refusal.done",
                **common,
                content_index=content_index,
                refusal=part.data["refusal"],
            )
        else:
            done = self._events.make(
                "response.reasoning_text.done",
                **common,
                content_index=content_index,
                text=part.data["text"],
            )
        return [
            done,
            self._events.make(
                "response.content_part.done",
                **common,
                content_index=content_index,
                part=copy.deepcopy(part.data),
            ),
        ]

    def _part_delta(
        self, item_type: str, part_type: str, text: str, logprobs: list[dict[str, Any]] | None
    ) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        item = self._open[-1] if self._open else None
        if item is None or item.data["type"] != item_type:
            events += self._close_all()
            if item_type == "message":
                data = message_item([], status="in_progress")
            else:
                data = reasoning_item("", status="in_progress")
                data["content"] = []
            item, added = self._add(data)
            events.append(added)
        if not item.parts or item.parts[-1].data["type"] != part_type:
            if item.parts:
                events += self._close_part(item, len(item.parts) - 1)
            if part_type == "output_text":
                part = _Part(output_text(""), "text")
            elif part_type == "refusal":
                part = _Part({"type": "refusal", "refusal": ""}, "refusal")
            else:
                part = _Part({"type": "reasoning_text", "text": ""}, "text")
            item.data["content"].append(part.data)
            item.parts.append(part)
            events.append(
                self._events.make(
                    "response.content_part.added",
                    item_id=item.data["id"],
                    output_index=item.index,
                    content_index=len(item.parts) - 1,
                    part=copy.deepcopy(part.data),
                )
            )
        part = item.parts[-1]
        part.pieces.append(text)
        common = {
            "item_id": item.data["id"],
            "output_index": item.index,
            "content_index": len(item.parts) - 1,
        }
        if part_type == "output_text":
            entries = logprobs or []
            part.data["logprobs"].extend(entries)
            events.append(
                self._events.make(
                    "response.output_text.delta", **common, delta=text, logprobs=entries
                )
            )
        elif part_type == "refusal":
            events.append(self._events.make("response.refusal.delta", **common, delta=text))
        else:
            events.append(self._events.make("response.reasoning_text.delta", **common, delta=text))
        return events

    def _call_delta(self, delta: dict[str, Any]) -> list[dict[str, Any]]:
        index = delta.get("index")
        if not isinstance(index, int) or isinstance(index, bool):
            index = self._implicit_index(delta.get("id"))
        function = delta.get("function") or {}
        events: list[dict[str, Any]] = []
        call = self._calls.get(index)
        if call is None:
            events += self._close_all()
            call = self._calls[index] = _Call()
            self._last_call = index
        elif call.closed:
            raise errors.UpstreamError(
                "The model server interleaved the deltas of parallel tool calls, which this "
                "gateway cannot stream."
            )
        if isinstance(delta.get("id"), str) and delta["id"] and not call.call_id:
            call.call_id = delta["id"]
        name = function.get("name")
        if isinstance(name, str) and name and not call.name:
            call.name = name
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            call.pending.append(arguments)
        if call.item is None and call.name:
            return events + self._add_call(call)
        if call.item is not None and call.pending:
            events += self._flush_arguments(call.item, call.pending)
        return events

    def _implicit_index(self, call_id: object) -> int:
        # Hubs that leave the index out send one call at a time: a new id starts a new call.
        last = self._last_call
        if last is None:
            return 0
        known = self._calls[last].call_id
        if isinstance(call_id, str) and call_id and known not in ("", call_id):
            return last + 1
        return last

    def _add_call(self, call: _Call) -> list[dict[str, Any]]:
        data = self._toolset.call_item(
            call_id=call.call_id or new_id("call"),
            chat_name=call.name,
            arguments="",
            status="in_progress",
        )
        item, added = self._add(data)
        item.call = call
        call.item = item
        return [added, *self._flush_arguments(item, call.pending)]

    def _flush_arguments(self, item: _Item, pending: list[str]) -> list[dict[str, Any]]:
        if not pending:
            return []
        text = "".join(pending)
        pending.clear()
        item.arguments.append(text)
        if item.data["type"] != "function_call":
            return []  # a custom tool's input goes out decoded, when the call closes
        return [
            self._events.make(
                "response.function_call_arguments.delta",
                item_id=item.data["id"],
                output_index=item.index,
                delta=text,
            )
        ]


def _seal(data: dict[str, Any], seal: Callable[[str], str]) -> None:
    data["encrypted_content"] = seal("".join(p.get("text", "") for p in data.get("content") or []))


# --- the dialect ---------------------------------------------------------------------------


class ChatDialect:
    """A Chat Completions hub (:class:`router_svc.dialects.Dialect`)."""

    name = "chat"
    path = "/chat/completions"
    tool_loop = True
    seals_reasoning = True
    own_compaction = False

    def request(
        self,
        req: TurnRequest,
        history: list[dict[str, Any]],
        injected: list[dict[str, Any]],
        *,
        stream: bool,
    ) -> dict[str, Any]:
        return chat_request(req, history, injected, stream=stream)

    def result(
        self,
        req: TurnRequest,
        answer: Any,
        *,
        response_id: str,
        created_at: int,
        tool_resources: Mapping[str, str],
    ) -> dict[str, Any]:
        return from_chat_completion(
            req,
            answer,
            response_id=response_id,
            created_at=created_at,
            tool_resources=tool_resources,
        )

    def translator(
        self,
        req: TurnRequest,
        *,
        response_id: str,
        created_at: int,
        tool_resources: Mapping[str, str],
        seal_reasoning: Callable[[str], str] | None = None,
    ) -> ChatStreamTranslator:
        translator = ChatStreamTranslator(
            req, response_id=response_id, created_at=created_at, tool_resources=tool_resources
        )
        translator.seal_reasoning = seal_reasoning
        return translator

    def summary_request(
        self, model: str, items: list[dict[str, Any]], instructions: str | None, prompt: str
    ) -> dict[str, Any]:
        messages: list[dict[str, Any]] = []
        if instructions:
            messages.append({"role": "system", "content": instructions})
        messages += chat_messages(items)
        messages.append({"role": "user", "content": prompt})
        return {"model": model, "messages": messages}

    def summary(self, answer: Any) -> tuple[object, dict[str, Any] | None]:
        choices = answer.get("choices")
        message = choices[0].get("message") if isinstance(choices, list) and choices else None
        text = message.get("content") if isinstance(message, dict) else None
        return text, usage_from_chat(answer.get("usage"))
