"""Chat messages: Responses items, oldest first, as the ``messages`` of a Chat Completions body.

A message keeps its role (system and developer messages become plain-text system messages, an
assistant's refusal its ``refusal``); its content parts become chat parts (text, ``image_url``,
``file``), and content a chat hub cannot fetch (an image given only by ``file_id``, a file only by
``file_url``) is refused with a 400. Consecutive calls become ONE assistant message with
``tool_calls`` (hubs reject one assistant message per call), each named as the toolset offers its
tool (:class:`router_svc.dialects.chat.tools.ChatToolset`); a custom tool call goes as a function
call whose one argument (``input``) is its free text, and a call's output as a ``tool`` message.
Reasoning items are not replayed, but a reasoning text the gateway sealed and got back
(:data:`OPENED_REASONING`) goes as the ``reasoning_content`` of the assistant message after it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from router_svc import errors
from router_svc.dialects.chat.tools import ChatToolset

_CHAT_IMAGE_DETAILS = ("auto", "low", "high")


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
