"""What the chat dialect's tests share: requests, SDK checks, declared tools, completions."""

from __future__ import annotations

from typing import Any

from openai.types.chat import completion_create_params
from pydantic import TypeAdapter

from router_svc import validate
from router_svc.dialects.chat.result import from_chat_completion
from tests.router_svc.dialects.support import FUNCTION as FUNCTION
from tests.router_svc.dialects.support import checked as checked
from tests.router_svc.dialects.support import req as req
from tests.router_svc.dialects.support import user as user

CHAT_BODY = TypeAdapter(completion_create_params.CompletionCreateParamsNonStreaming)
CHAT_STREAM_BODY = TypeAdapter(completion_create_params.CompletionCreateParamsStreaming)


TOOLS = [
    FUNCTION,
    {"type": "function", "name": "time"},
    {"type": "code_interpreter", "container": {"type": "auto"}},
    {"type": "shell"},
    {"type": "web_search"},
]


CODEX_NAMESPACE = {
    "type": "namespace",
    "name": "multi_agent_v1",
    "description": "Tools for spawning and managing sub-agents.",
    "tools": [
        {
            "type": "function",
            "name": "spawn_agent",
            "description": "Spawn an agent",
            "parameters": {"type": "object", "properties": {"task": {"type": "string"}}},
            "strict": False,
        },
        {"type": "function", "name": "weather", "description": "Clashes with a top-level tool"},
        {"type": "custom", "name": "notes", "description": "Free-text notes"},
    ],
}
PATCH = {
    "type": "custom",
    "name": "apply_patch",
    "description": "Apply a patch",
    "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"},
}


def completion(
    message: dict[str, Any], finish: str = "stop", usage: Any = None, **choice: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", **message},
                "finish_reason": finish,
                **choice,
            }
        ],
    }
    if usage is not None:
        body["usage"] = usage
    return body


USAGE = {
    "prompt_tokens": 10,
    "completion_tokens": 5,
    "total_tokens": 15,
    "prompt_tokens_details": {"cached_tokens": 4},
    "completion_tokens_details": {"reasoning_tokens": 2},
}


def back(
    message: dict[str, Any], request: validate.TurnRequest | None = None, **kwargs: Any
) -> dict[str, Any]:
    response = from_chat_completion(
        request or req(input="x"), completion(message, **kwargs), response_id="resp_1", created_at=7
    )
    checked(response)
    return response
