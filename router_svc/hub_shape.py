"""The types of a hub's answer (a Chat Completions hub's, or a Responses hub's), checked before
anything is made of it.

The translation reads a completion (or a stream chunk) leniently where the OpenAI spec leaves a
field out or null, but a field of the wrong type (``choices`` an object, ``message.content`` a
number, ``function.arguments`` an object, ``usage.prompt_tokens`` a string) is the hub speaking
nonsense: the turn is a 502 ``upstream_malformed_response`` (in a stream, ``error`` and
``response.failed``) and nothing is stored, rather than an answer with silently missing text or
token counts, or a crash.

Only the fields the translation reads are checked, and a check is a few ``isinstance`` calls per
chunk; the path to the offending field is built only when one is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from router_svc import errors, hub

MALFORMED = "upstream_malformed_response"

# Fields of a message (or delta) that are a string when present.
_TEXT_FIELDS = frozenset({"role", "refusal", "reasoning_content", "reasoning"})
# Token counts of usage and of its details.
_COUNTS = ("prompt_tokens", "completion_tokens", "total_tokens")
_DETAILS = (
    ("prompt_tokens_details", "cached_tokens"),
    ("completion_tokens_details", "reasoning_tokens"),
)


def check_completion(completion: Mapping[str, Any]) -> None:
    """Raises :class:`errors.UpstreamError` when a field of a chat completion has a wrong type."""
    choices = completion.get("choices")
    if not isinstance(choices, list):
        raise _wrong("choices", "an array", choices)
    for i, choice in enumerate(choices):
        _check_choice(choice, i, "message")
    usage = completion.get("usage")
    if usage is not None:
        _check_usage(usage)


def check_chunk(chunk: Mapping[str, Any]) -> None:
    """Raises :class:`errors.UpstreamError` when a field of a stream chunk has a wrong type."""
    choices = chunk.get("choices")
    if choices is not None:
        if not isinstance(choices, list):
            raise _wrong("choices", "an array", choices)
        for i, choice in enumerate(choices):
            _check_choice(choice, i, "delta")
    usage = chunk.get("usage")
    if usage is not None:
        _check_usage(usage)


# --- a Responses hub ---------------------------------------------------------------------------

_STATUSES = frozenset({"completed", "incomplete", "failed", "in_progress", "queued", "cancelled"})
_RESPONSE_COUNTS = ("input_tokens", "output_tokens", "total_tokens")


def check_response(response: Mapping[str, Any]) -> None:
    """Raises :class:`errors.UpstreamError` when a field of a Responses hub's response that the
    router keeps (status, output, usage, error, incomplete_details) has a wrong type."""
    output = response.get("output")
    if not isinstance(output, list):
        raise _wrong("output", "an array", output)
    for i, item in enumerate(output):
        if not isinstance(item, dict):
            raise _wrong(f"output[{i}]", "an object", item)
        _optional(item, "type", str, "a string", f"output[{i}]")
    status = response.get("status")
    if status is not None and status not in _STATUSES:
        raise _wrong("status", "a response status", status)
    for name in ("error", "incomplete_details"):
        _optional(response, name, dict, "an object", "response")
    usage = response.get("usage")
    if usage is not None:
        if not isinstance(usage, dict):
            raise _wrong("usage", "an object", usage)
        for name in _RESPONSE_COUNTS:
            _optional_int(usage, name, "usage")


def check_event(event: Mapping[str, Any]) -> None:
    """Raises :class:`errors.UpstreamError` when a field of a Responses hub's stream event that is
    passed on to the client has a wrong type (the terminal event's response is checked by
    :func:`check_response`)."""
    for name, value in event.items():
        if value is None:
            continue
        if name == "delta":
            if not isinstance(value, str):
                raise _wrong("delta", "a string", value)
        elif name in ("output_index", "content_index", "summary_index"):
            _int(value, name)
        elif name in ("item", "part"):
            if not isinstance(value, dict):
                raise _wrong(name, "an object", value)
        elif name in ("item_id", "text", "arguments", "name"):
            if not isinstance(value, str):
                raise _wrong(name, "a string", value)


# --- Chat Completions ---------------------------------------------------------------------------


def _check_choice(choice: object, i: int, key: str) -> None:
    if not isinstance(choice, dict):
        raise _wrong(f"choices[{i}]", "an object", choice)
    # By the keys present (a chunk's choice and delta hold one or two), not by the keys read.
    for name, value in choice.items():
        if value is None:
            continue
        if name == key:
            _check_message(value, f"choices[{i}].{key}")
        elif name == "finish_reason":
            if not isinstance(value, str):
                raise _wrong(f"choices[{i}].finish_reason", "a string", value)
        elif name == "index":
            _int(value, f"choices[{i}].index")
        elif name == "logprobs":
            if not isinstance(value, dict):
                raise _wrong(f"choices[{i}].logprobs", "an object", value)
            _optional(value, "content", list, "an array", f"choices[{i}].logprobs")


def _check_message(message: object, path: str) -> None:
    if not isinstance(message, dict):
        raise _wrong(path, "an object", message)
    for name, value in message.items():
        if value is None or (name in _TEXT_FIELDS and isinstance(value, str)):
            continue
        if name in _TEXT_FIELDS:
            raise _wrong(f"{path}.{name}", "a string", value)
        if name == "content":
            _check_content(value, f"{path}.content")
        elif name == "tool_calls":
            _check_calls(value, f"{path}.tool_calls")


def _check_content(content: object, path: str) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise _wrong(path, "a string", content)
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise _wrong(f"{path}[{j}]", "an object", part)
        _optional(part, "text", str, "a string", f"{path}[{j}]")


def _check_calls(calls: object, path: str) -> None:
    if not isinstance(calls, list):
        raise _wrong(path, "an array", calls)
    for j, call in enumerate(calls):
        where = f"{path}[{j}]"
        if not isinstance(call, dict):
            raise _wrong(where, "an object", call)
        _optional(call, "id", str, "a string", where)
        _optional_int(call, "index", where)
        function = call.get("function")
        if function is None:
            continue
        if not isinstance(function, dict):
            raise _wrong(f"{where}.function", "an object", function)
        _optional(function, "name", str, "a string", f"{where}.function")
        _optional(function, "arguments", str, "a string", f"{where}.function")


def _check_usage(usage: object) -> None:
    if not isinstance(usage, dict):
        raise _wrong("usage", "an object", usage)
    for name in _COUNTS:
        _optional_int(usage, name, "usage")
    for name, count in _DETAILS:
        details = usage.get(name)
        if details is None:
            continue
        if not isinstance(details, dict):
            raise _wrong(f"usage.{name}", "an object", details)
        _optional_int(details, count, f"usage.{name}")


def _optional(obj: Mapping[str, Any], key: str, kind: type, expected: str, path: str) -> None:
    value = obj.get(key)
    if value is not None and not isinstance(value, kind):
        raise _wrong(f"{path}.{key}", expected, value)


def _optional_int(obj: Mapping[str, Any], key: str, path: str) -> None:
    value = obj.get(key)
    if value is not None:
        _int(value, f"{path}.{key}")


def _int(value: object, path: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _wrong(path, "an integer", value)


def _wrong(path: str, expected: str, value: object) -> errors.UpstreamError:
    hub.HUB_ERRORS.labels(MALFORMED).inc()
    return errors.UpstreamError(
        f"The model server's answer has {_kind(value)} at '{path}' where {expected} belongs.",
        code=MALFORMED,
    )


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "null"
