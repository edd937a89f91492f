"""Responses API <-> Chat Completions: the hub request, the Response object, and back.

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
(:mod:`router_svc.tools`) offers them itself and leaves them out of the request it translates
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
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import orjson
from prometheus_client import Counter

from router_svc import errors, hub_shape, validate
from router_svc.ids import new_id
from router_svc.inputs import output_text
from router_svc.validate import TurnRequest
from router_svc.vocabulary import HUB_SAMPLING_FIELDS, REQUEST_FIELDS

log = logging.getLogger(__name__)

TOOLS_NOT_RUN = Counter(
    "respgw_router_tools_not_run_total",
    "Requests to a Chat Completions hub that declared a tool the model was not offered (web "
    "search, and the stateful tools a chat model cannot call), by tool type.",
    ["type"],
)
_not_run_logged: set[str] = set()

# The codes a Response object's "error" may carry (ResponseError.code in the openai SDK); any
# other failure is reported there as server_error.
RESPONSE_ERROR_CODES = frozenset(
    {
        "server_error",
        "rate_limit_exceeded",
        "invalid_prompt",
        "vector_store_timeout",
        "invalid_image",
        "invalid_image_format",
        "invalid_base64_image",
        "invalid_image_url",
        "image_too_large",
        "image_too_small",
        "image_parse_error",
        "image_content_policy_violation",
        "invalid_image_mode",
        "image_file_too_large",
        "unsupported_image_media_type",
        "empty_image_file",
        "failed_to_download_image",
        "image_file_not_found",
    }
)

LOGPROBS_INCLUDE = "message.output_text.logprobs"

NO_RESOURCES: Mapping[str, str] = MappingProxyType({})
NO_STRICT: Mapping[str, bool] = MappingProxyType({})

# Fields of the caller's body that the gateway itself implements, so a Responses hub never sees
# them: the hub is used statelessly and the gateway stores the turn (and runs background turns).
_GATEWAY_FIELDS = frozenset(
    {
        "previous_response_id",
        "conversation",
        "store",
        "background",
        "background_options",
        "stream",
        "stream_options",
    }
)
_CHAT_IMAGE_DETAILS = ("auto", "low", "high")
# The items that answer a call.
_CALL_OUTPUTS = frozenset({"function_call_output", "custom_tool_call_output"})
# Sampling parameters whose zero changes nothing: a zero is not sent to a Responses hub, which
# (OpenAI's) may not know them.
_NEUTRAL_AT_ZERO = ("presence_penalty", "frequency_penalty")


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


# --- out: a Responses hub ------------------------------------------------------------------


def responses_request(
    req: TurnRequest,
    history: list[dict[str, Any]],
    injected: list[dict[str, Any]],
    *,
    stream: bool,
) -> dict[str, Any]:
    """The body for POST {hub}/responses: the hub is used statelessly (store false).

    The result shares nested values with the request; it is meant to be serialized, not mutated.
    """
    out: dict[str, Any] = {
        key: value
        for key, value in req.body.items()
        if key in REQUEST_FIELDS
        and key not in _GATEWAY_FIELDS
        and key not in ("model", "input", "instructions")
    }
    for key in HUB_SAMPLING_FIELDS:
        value = req.body.get(key)
        if value is not None and not (key in _NEUTRAL_AT_ZERO and value == 0):
            out[key] = value
    out["model"] = req.model
    out["input"] = [item for item in (*history, *injected, *req.input_items) if _replayable(item)]
    if req.instructions is not None:
        out["instructions"] = req.instructions
    out["store"] = False
    if stream:
        out["stream"] = True
        if req.body.get("stream_options") is not None:
            out["stream_options"] = req.body["stream_options"]
    return out


def _replayable(item: Mapping[str, Any]) -> bool:
    # With store false the hub cannot look a reasoning item up by id; only its encrypted content
    # lets it be replayed.
    return item.get("type") != "reasoning" or bool(item.get("encrypted_content"))


# --- the Response object ---------------------------------------------------------------------


def response_object(
    req: TurnRequest,
    *,
    response_id: str,
    created_at: int,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
    incomplete_details: dict[str, Any] | None = None,
    tool_resources: Mapping[str, str] = NO_RESOURCES,
    completed_at: int | None = None,
    function_strict: Mapping[str, bool] = NO_STRICT,
) -> dict[str, Any]:
    """The Response object, echoing the request's parameters (and OpenAI's defaults) as OpenAI does.

    ``completed_at`` defaults to now for a completed response and is null otherwise.
    ``function_strict`` is the strictness a Responses hub applied to function tools, by name.
    """
    body = req.body

    def given(key: str, default: Any = None) -> Any:
        value = body.get(key)
        return default if value is None else value

    if status == "completed" and completed_at is None:
        completed_at = int(time.time())
    elif status != "completed":
        completed_at = None
    reasoning = given("reasoning", {})
    text = given("text", {})
    tier = given("service_tier", "auto")
    # OpenAI reports the tier that served the request: "auto" is served at "default", and "fast"
    # is served (and reported) as "priority".
    tier = {"auto": "default", "fast": "priority"}.get(tier, tier)
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": req.background,
        "completed_at": completed_at,
        "conversation": {"id": req.conversation_id} if req.conversation_id else None,
        "error": error,
        "incomplete_details": incomplete_details,
        "instructions": req.instructions,
        "max_output_tokens": given("max_output_tokens"),
        "max_tool_calls": given("max_tool_calls"),
        "model": req.model,
        "output": output,
        "parallel_tool_calls": given("parallel_tool_calls", True),
        "previous_response_id": req.previous_response_id,
        "prompt": given("prompt"),
        "prompt_cache_key": given("prompt_cache_key"),
        "prompt_cache_retention": given("prompt_cache_retention"),
        "reasoning": {
            **reasoning,
            "effort": reasoning.get("effort"),
            "summary": reasoning.get("summary"),
        },
        "safety_identifier": given("safety_identifier"),
        "service_tier": tier,
        "store": req.store,
        "temperature": given("temperature", 1.0),
        "text": {
            **text,
            "format": text.get("format") or {"type": "text"},
            "verbosity": text.get("verbosity") or "medium",
        },
        "tool_choice": given("tool_choice", "auto"),
        "tools": echo_tools(req.tools, tool_resources, function_strict),
        "top_logprobs": given("top_logprobs", 0),
        "top_p": given("top_p", 1.0),
        "presence_penalty": given("presence_penalty", 0.0),
        "frequency_penalty": given("frequency_penalty", 0.0),
        "truncation": given("truncation", "disabled"),
        "usage": usage,
        "user": given("user"),
        "metadata": dict(req.metadata),
        **_platform_echo(body),
    }


def _platform_echo(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the Response object says about the fields that mean something on OpenAI's platform
    only: what was applied, in the Response object's shapes (openai's ``Response`` type)."""
    programs = body.get("access_programs") or {}
    image = body.get("image")
    options = body.get("prompt_cache_options")
    applied_options = None
    diagnostics = None
    if options is not None:
        applied_options = {
            "mode": options.get("mode") or "implicit",
            "ttl": options.get("ttl") or "30m",
            "comparison_response_id": options.get("comparison_response_id"),
        }
        if options.get("comparison_response_id") is not None:
            # Asked for: the gateway keeps no prompt cache to diagnose.
            diagnostics = {"type": "unavailable"}
    compression = (image or {}).get("context_compression")
    return {
        # Null is OpenAI's "the implicit Standard program".
        "access_programs": {"cyber": programs["cyber"]} if programs.get("cyber") else None,
        # The policy applied: "auto" chooses none here (the gateway does not compress images).
        "image": None
        if image is None
        else {"context_compression": "disabled" if compression in (None, "auto") else compression},
        # Moderation results: the gateway moderates nothing, so there are none.
        "moderation": None,
        "prompt_cache_options": applied_options,
        "prompt_cache_diagnostics": diagnostics,
    }


def echo_tools(
    tools: Iterable[Mapping[str, Any]],
    tool_resources: Mapping[str, str],
    function_strict: Mapping[str, bool] = NO_STRICT,
) -> list[dict[str, Any]]:
    """The request's tools as the response echoes them, with prepared stateful resources.

    A function tool always carries ``description``, ``parameters`` (null when not given) and
    ``strict``. A ``strict`` the caller left out (or null) is echoed as what was applied: false
    for a chat hub, which gets no ``strict`` then and calls the function best-effort (OpenAI's
    own fallback when it cannot make a schema strict), or what a Responses hub reports in
    ``function_strict``.
    """
    out: list[dict[str, Any]] = []
    for tool in tools:
        echoed = dict(tool)
        kind = echoed.get("type")
        if kind == "function":
            echoed.setdefault("description", None)
            echoed.setdefault("parameters", None)
            if echoed.get("strict") is None:
                echoed["strict"] = function_strict.get(str(echoed.get("name")), False)
        elif kind == "code_interpreter" and tool_resources.get("code_interpreter"):
            echoed["container"] = tool_resources["code_interpreter"]
        elif kind == "shell" and tool_resources.get("shell"):
            echoed["environment"] = {
                "type": "container_reference",
                "container_id": tool_resources["shell"],
            }
        out.append(echoed)
    return out


def error_object(code: str, message: str) -> dict[str, Any]:
    """A Response's ``error``: codes outside OpenAI's list are reported as server_error."""
    return {"code": code if code in RESPONSE_ERROR_CODES else "server_error", "message": message}


# --- output items ----------------------------------------------------------------------------


def message_item(
    parts: list[dict[str, Any]], *, status: str = "completed", item_id: str | None = None
) -> dict[str, Any]:
    return {
        "id": item_id or new_id("msg"),
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": parts,
    }


def function_call_item(
    *,
    call_id: str,
    name: str,
    arguments: str,
    status: str = "completed",
    item_id: str | None = None,
) -> dict[str, Any]:
    return {
        "id": item_id or new_id("fc"),
        "type": "function_call",
        "status": status,
        "arguments": arguments,
        "call_id": call_id,
        "name": name,
    }


def reasoning_item(
    text: str, *, status: str = "completed", item_id: str | None = None
) -> dict[str, Any]:
    return {
        "id": item_id or new_id("rs"),
        "type": "reasoning",
        "status": status,
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
    }


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


# --- back: a Responses hub -------------------------------------------------------------------


def from_responses_result(
    req: TurnRequest,
    upstream: dict[str, Any],
    *,
    response_id: str,
    created_at: int,
    tool_resources: Mapping[str, str] = NO_RESOURCES,
) -> dict[str, Any]:
    """A Responses hub's response as ours: our id and echo, the hub's items (with their ids)."""
    if not isinstance(upstream, dict):
        raise errors.UpstreamError(
            "The model server's answer is not a JSON object.", code=hub_shape.MALFORMED
        )
    hub_shape.check_response(upstream)
    output = upstream["output"]
    status = upstream.get("status") or "completed"
    completed_at = upstream.get("completed_at")
    return response_object(
        req,
        response_id=response_id,
        created_at=created_at,
        status=status,
        output=[with_id(item) for item in output],
        usage=upstream.get("usage"),
        error=upstream.get("error"),
        incomplete_details=upstream.get("incomplete_details"),
        tool_resources=tool_resources,
        completed_at=completed_at if isinstance(completed_at, int) else None,
        function_strict=_strict_by_name(upstream.get("tools")),
    )


def _strict_by_name(tools: Any) -> dict[str, bool]:
    """The strictness a Responses hub echoes for its function tools (OpenAI makes a function
    strict when it can, unless the caller said otherwise)."""
    out: dict[str, bool] = {}
    for tool in tools if isinstance(tools, list) else []:
        if (
            isinstance(tool, dict)
            and tool.get("type") == "function"
            and isinstance(tool.get("name"), str)
            and isinstance(tool.get("strict"), bool)
        ):
            out[tool["name"]] = tool["strict"]
    return out


def with_id(item: dict[str, Any]) -> dict[str, Any]:
    """The item with an id (a few item types have an optional one), so that it can be stored."""
    if item.get("id"):
        return item
    prefix = {"function_call": "fc", "custom_tool_call": "ctc"}.get(str(item.get("type")), "item")
    return {"id": new_id(prefix), **item}
