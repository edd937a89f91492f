"""Where translate.py's names live now, for the importers not yet moved (issue 14).

The chat dialect is :mod:`router_svc.dialects.chat`, the responses dialect
:mod:`router_svc.dialects.responses`, the Response object and its items :mod:`router_svc.response`.
Nothing is defined here; import from those modules.
"""

from __future__ import annotations

from router_svc.dialects.chat import (
    CUSTOM_TOOL_PARAMETERS,
    INCOMPLETE_REASONS,
    LOGPROBS_INCLUDE,
    OPENED_REASONING,
    TOOLS_NOT_RUN,
    ChatFunction,
    ChatToolset,
    chat_logprobs,
    chat_messages,
    chat_reasoning,
    chat_request,
    chat_tools,
    custom_input,
    from_chat_completion,
    usage_from_chat,
)
from router_svc.dialects.responses import (
    from_responses_result,
    responses_request,
)
from router_svc.response import (
    NO_RESOURCES,
    NO_STRICT,
    RESPONSE_ERROR_CODES,
    echo_tools,
    error_object,
    function_call_item,
    message_item,
    reasoning_item,
    response_object,
    with_id,
)

__all__ = [
    "CUSTOM_TOOL_PARAMETERS",
    "INCOMPLETE_REASONS",
    "LOGPROBS_INCLUDE",
    "NO_RESOURCES",
    "NO_STRICT",
    "OPENED_REASONING",
    "RESPONSE_ERROR_CODES",
    "TOOLS_NOT_RUN",
    "ChatFunction",
    "ChatToolset",
    "chat_logprobs",
    "chat_messages",
    "chat_reasoning",
    "chat_request",
    "chat_tools",
    "custom_input",
    "echo_tools",
    "error_object",
    "from_chat_completion",
    "from_responses_result",
    "function_call_item",
    "message_item",
    "reasoning_item",
    "response_object",
    "responses_request",
    "usage_from_chat",
    "with_id",
]
