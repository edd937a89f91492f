"""The chat request: a turn as the body of POST {hub}/chat/completions, and what it refuses.

Going out, a turn becomes one Chat Completions request: a system message from the current
request's ``instructions`` only (never an earlier turn's), then the history, the items a bootstrap
service injected and the caller's input, oldest first, as chat messages
(:mod:`router_svc.dialects.chat.messages`); the outputs the input opens with go right after the
history. The model is offered the declared tools as functions
(:mod:`router_svc.dialects.chat.tools`). The web search tools are not offered and are reported
(``respgw_router_tools_not_run_total``; the client sees them named in the answer's
``x-respgw-tools-not-run`` header, router_svc.turn), and so are the stateful ``code_interpreter`` and
hosted ``shell`` when no execution service runs them: when one does, the tool loop
(:mod:`router_svc.tool_loop`) offers them itself and leaves them out of the request it translates
here, as it always does a local ``shell`` (its calls are returned to the client). A prompt template or a tool nobody would run is refused (:func:`check_chat_hub`, which the
dialect's ``refuse`` runs where the turn is parsed). Request fields a chat hub has no use for
(store, metadata, truncation, service_tier, prompt_cache_key, ...) are dropped from the hub
request, as OpenAI-compatible servers do, and still echoed on the response; the hub's own sampling
parameters (penalties, seed, vLLM's extras) reach it as given, and top-level fields the gateway
does not know reach no hub.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from prometheus_client import Counter

from router_svc import bootstrap, errors, vocabulary
from router_svc.dialects.chat.messages import chat_messages
from router_svc.dialects.chat.result import LOGPROBS_INCLUDE
from router_svc.dialects.chat.tools import ChatToolset, chat_tool_choice
from router_svc.shapes import Item
from router_svc.validate import TurnRequest
from router_svc.vocabulary import HUB_SAMPLING_FIELDS

# The dialect's logger, named as before its modules were split.
log = logging.getLogger("router_svc.dialects.chat")

TOOLS_NOT_RUN = Counter(
    "respgw_router_tools_not_run_total",
    "Requests to a Chat Completions hub that declared a tool the model was not offered (web "
    "search, and the stateful tools a chat model cannot call), by tool type.",
    ["type"],
)
_not_run_logged: set[str] = set()

# The request's fields that go to the hub as they are, in this order.
_FORWARDED = ("temperature", "top_p", "user", *sorted(HUB_SAMPLING_FIELDS))
_FORWARDED_SET = frozenset(_FORWARDED)

# The items that answer a call.
_CALL_OUTPUTS = frozenset({"function_call_output", "custom_tool_call_output"})


def chat_request(
    req: TurnRequest,
    history: list[Item],
    injected: list[Item],
    *,
    stream: bool,
) -> dict[str, Any]:
    """The body for POST {hub}/chat/completions.

    The outputs the input opens with answer the calls at the end of the history, so they go
    right after it, ahead of the injected items: a chat hub wants a tool call answered by the
    very next messages."""
    body = req.body
    _report_not_run(check_chat_hub(req))
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
    choice, allowed = chat_tool_choice(body.get("tool_choice"), toolset)
    if allowed is not None:
        tools = [t for t in tools if t["function"]["name"] in allowed]
    if tools:
        out["tools"] = tools
        if choice is not None:
            out["tool_choice"] = choice
        if body.get("parallel_tool_calls") is not None:
            out["parallel_tool_calls"] = body["parallel_tool_calls"]

    if not body.keys().isdisjoint(_FORWARDED_SET):
        for key in _FORWARDED:
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


def _check_auto_container(tool: dict[str, Any], i: int) -> None:
    """Refuses the options of an automatic container (a code_interpreter's ``container``
    object, a shell's ``container_auto`` environment) that the gateway's sessions cannot honour,
    rather than run the call without them. ``memory_limit`` is honoured by the bootstrap service
    (the session it makes gets that memory)."""
    if tool.get("type") == "code_interpreter":
        options, path = tool.get("container"), f"tools[{i}].container"
    else:
        options, path = tool.get("environment"), f"tools[{i}].environment"
        if not isinstance(options, dict) or options.get("type") != "container_auto":
            return
    if not isinstance(options, dict):
        return
    limit = options.get("memory_limit")
    if limit is not None and limit not in vocabulary.CONTAINER_MEMORY_LIMITS:
        raise errors.InvalidRequest(
            f"Invalid value for '{path}.memory_limit': expected one of "
            f"{', '.join(vocabulary.CONTAINER_MEMORY_LIMITS)}.",
            param=f"{path}.memory_limit",
            code="invalid_value",
        )
    if options.get("file_ids"):
        raise errors.InvalidRequest(
            "file_ids is not supported by this server (it has no Files API): create a container, "
            "upload the files with POST /v1/containers/{container_id}/files and name the "
            "container instead.",
            param=f"{path}.file_ids",
            code="unsupported_parameter",
        )
    policy = options.get("network_policy")
    if policy is not None and (not isinstance(policy, dict) or policy.get("type") != "disabled"):
        raise errors.InvalidRequest(
            'Only network_policy {"type": "disabled"} is supported: containers here have no '
            "network access.",
            param=f"{path}.network_policy",
            code="unsupported_value",
        )
    if options.get("skills"):
        raise errors.InvalidRequest(
            "skills are not supported by this server.",
            param=f"{path}.skills",
            code="unsupported_parameter",
        )


def check_chat_hub(req: TurnRequest) -> list[str]:
    """Refuses what a Chat Completions hub cannot do; returns the types of the declared tools
    that are accepted but not offered to the model (:data:`vocabulary.CHAT_NOT_RUN_TOOLS`), in
    order.

    Refused: a ``prompt`` template (the gateway has no prompt store to resolve it from, and
    answering without it would answer another question), and the tools nobody would run
    (OpenAI's error for a hosted tool a model does not support, with the reason), and the
    options of an automatic container the gateway's sessions cannot honour.
    """
    prompt = req.body.get("prompt")
    if prompt is not None:
        raise errors.InvalidRequest(
            f"Prompt templates are not supported by this server: prompt '{prompt.get('id')}' "
            "cannot be resolved, because its model server speaks Chat Completions. Send the "
            "prompt's text as 'instructions' and 'input' instead.",
            param="prompt",
            code="unsupported_parameter",
        )
    not_run: list[str] = []
    for i, tool in enumerate(req.tools):
        kind = str(tool.get("type"))
        if kind in vocabulary.CHAT_OFFERED_TOOLS:
            continue
        if kind in ("code_interpreter", "shell"):
            _check_auto_container(tool, i)
        if bootstrap.is_local_shell(tool):
            continue  # offered by the tool loop, its calls returned to the client
        if kind in vocabulary.CHAT_NOT_RUN_TOOLS:
            if kind not in not_run:
                not_run.append(kind)
            continue
        if kind in vocabulary.CHAT_CLIENT_REFUSED:
            message = (
                f"Tool '{kind}' is not supported with {req.model}: this server's model server "
                "speaks Chat Completions, which has no such tool. Declare a function tool "
                "instead."
            )
        else:
            message = (
                f"Hosted tool '{kind}' is not supported with {req.model}: this server's model "
                f"server speaks Chat Completions, and the gateway does not run '{kind}' itself."
            )
        raise errors.InvalidRequest(message, param="tools")
    return not_run
