"""Chat tools: the declared tools a chat hub is offered as functions, and its calls read back.

The model is offered functions (:class:`ChatToolset`): the function tools, each custom tool as a
function taking its free text as one string argument (``input``), and the function and custom
tools of each namespace, flattened (under their own names, or ``<namespace>__<name>`` when that
name is taken). A ``tool_choice`` names them as offered (:func:`chat_tool_choice`). A chat tool
call comes back as the item of its tool: a ``function_call`` (``fc_``, with its ``namespace`` for a
namespace's function) or, for a custom tool, a ``custom_tool_call`` (``ctc_``) whose ``input`` is
the call's one argument (:meth:`ChatToolset.call_item`). Other tool types are not offered
(:func:`router_svc.dialects.chat.request.check_chat_hub` refuses or reports them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import orjson

from router_svc.ids import new_id
from router_svc.response import function_call_item
from router_svc.shapes import Item

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
    ) -> Item:
        """A chat tool call as the Responses item it is: a ``function_call`` (with the
        ``namespace`` of a namespace's function), or a ``custom_tool_call`` whose ``input`` is
        the call's one argument (the raw arguments when the hub did not send that)."""
        function = self.find(chat_name)
        if function is None:
            return function_call_item(
                call_id=call_id, name=chat_name, arguments=arguments, status=status, item_id=item_id
            )
        if function.kind == "custom":
            item: Item = {
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


def chat_tool_choice(
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
