"""The chat answer: a whole chat completion as the Response object.

A chat completion becomes output items in OpenAI's shapes: a reasoning item (when the hub returned
``reasoning_content``), a message (``msg_``) with its text (and logprobs when included) and its
refusal, then one item per tool call (:meth:`router_svc.dialects.chat.tools.ChatToolset.call_item`);
with usage in Responses terms, and a finish reason that says the answer was cut short
(:data:`INCOMPLETE_REASONS`) as an incomplete response. The pieces a streamed answer reads too
(usage, logprobs, reasoning text) are here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from router_svc import errors, hub_shape
from router_svc.dialects.chat.tools import ChatToolset
from router_svc.ids import new_id
from router_svc.inputs import output_text
from router_svc.response import NO_RESOURCES, message_item, reasoning_item, response_object
from router_svc.shapes import Item, ResponseObject
from router_svc.validate import TurnRequest

LOGPROBS_INCLUDE = "message.output_text.logprobs"


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
) -> ResponseObject:
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

    output: list[Item] = []
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
