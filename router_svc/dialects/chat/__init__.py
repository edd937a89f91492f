"""The chat dialect: a Chat Completions hub (POST {hub}/chat/completions), :class:`ChatDialect`.

The gateway does what such a hub cannot: it runs the stateful tool loop, seals reasoning for
stateless clients and compacts long histories itself. Its parts, one concept each::

    request.py   a turn as the hub request, and what a chat hub cannot take, refused
    messages.py  Responses items as chat messages (history, injected items, input)
    tools.py     the declared tools offered as functions, and the hub's calls read back
    result.py    a whole chat completion as the Response object (usage, logprobs, reasoning)
    stream.py    a streamed chat completion's chunks as Responses events

The names callers use are re-exported here (``from router_svc.dialects import chat``, then
``chat.chat_request``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from router_svc.dialects.chat.messages import OPENED_REASONING, chat_messages
from router_svc.dialects.chat.request import TOOLS_NOT_RUN, chat_request, check_chat_hub
from router_svc.dialects.chat.result import (
    INCOMPLETE_REASONS,
    LOGPROBS_INCLUDE,
    chat_logprobs,
    chat_reasoning,
    from_chat_completion,
    usage_from_chat,
)
from router_svc.dialects.chat.stream import ChatStreamTranslator
from router_svc.dialects.chat.tools import (
    CUSTOM_TOOL_PARAMETERS,
    ChatFunction,
    ChatToolset,
    chat_tool_choice,
    chat_tools,
    custom_input,
)
from router_svc.shapes import Item, ResponseObject
from router_svc.validate import TurnRequest

__all__ = [
    "CUSTOM_TOOL_PARAMETERS",
    "INCOMPLETE_REASONS",
    "LOGPROBS_INCLUDE",
    "OPENED_REASONING",
    "TOOLS_NOT_RUN",
    "ChatDialect",
    "ChatFunction",
    "ChatStreamTranslator",
    "ChatToolset",
    "chat_logprobs",
    "chat_messages",
    "chat_reasoning",
    "chat_request",
    "chat_tool_choice",
    "chat_tools",
    "check_chat_hub",
    "custom_input",
    "from_chat_completion",
    "usage_from_chat",
]


class ChatDialect:
    """A Chat Completions hub (:class:`router_svc.dialects.Dialect`)."""

    name = "chat"
    path = "/chat/completions"
    tool_loop = True
    seals_reasoning = True
    own_compaction = False

    def refuse(self, req: TurnRequest) -> None:
        """A prompt template, and the tools nobody would run (:func:`check_chat_hub`)."""
        check_chat_hub(req)

    def request(
        self,
        req: TurnRequest,
        history: list[Item],
        injected: list[Item],
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
    ) -> ResponseObject:
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
        self, model: str, items: list[Item], instructions: str | None, prompt: str
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
