"""The Response object: what POST /v1/responses answers, whichever dialect the hub speaks.

:func:`response_object` echoes the request's parameters (and OpenAI's defaults) as OpenAI does;
:func:`error_object` is its ``error``; the item builders (:func:`message_item`,
:func:`function_call_item`, :func:`reasoning_item`, :func:`with_id`) make output items in
OpenAI's shapes. Both dialects (:mod:`router_svc.dialects`) build their answers with these.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from router_svc.ids import new_id
from router_svc.shapes import Item, ResponseError, ResponseObject
from router_svc.validate import TurnRequest

# The codes a Response object's "error" may carry (ResponseError.code in the openai SDK); any
# other failure is reported there as server_error.
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


NO_RESOURCES: Mapping[str, str] = MappingProxyType({})
NO_STRICT: Mapping[str, bool] = MappingProxyType({})


def response_object(
    req: TurnRequest,
    *,
    response_id: str,
    created_at: int,
    status: str,
    output: list[Item],
    usage: dict[str, Any] | None = None,
    error: ResponseError | None = None,
    incomplete_details: dict[str, Any] | None = None,
    tool_resources: Mapping[str, str] = NO_RESOURCES,
    completed_at: int | None = None,
    function_strict: Mapping[str, bool] = NO_STRICT,
) -> ResponseObject:
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


def _platform_echo(body: Mapping[str, Any]) -> ResponseObject:
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


def error_object(code: str, message: str) -> ResponseError:
    """A Response's ``error``: codes outside OpenAI's list are reported as server_error."""
    return {"code": code if code in RESPONSE_ERROR_CODES else "server_error", "message": message}


# --- output items ----------------------------------------------------------------------------


def message_item(
    parts: list[dict[str, Any]], *, status: str = "completed", item_id: str | None = None
) -> Item:
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
) -> Item:
    return {
        "id": item_id or new_id("fc"),
        "type": "function_call",
        "status": status,
        "arguments": arguments,
        "call_id": call_id,
        "name": name,
    }


def reasoning_item(text: str, *, status: str = "completed", item_id: str | None = None) -> Item:
    return {
        "id": item_id or new_id("rs"),
        "type": "reasoning",
        "status": status,
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
    }


def with_id(item: Item) -> Item:
    """The item with an id (a few item types have an optional one), so that it can be stored."""
    if item.get("id"):
        return item
    prefix = {"function_call": "fc", "custom_tool_call": "ctc"}.get(str(item.get("type")), "item")
    return {"id": new_id(prefix), **item}
