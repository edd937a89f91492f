"""The gateway's vocabulary against the installed openai SDK's: a test here fails when the SDK
grows an ``include`` value, a tool type or an input item type the gateway does not know, so that
upgrading the SDK in the lock file shows what to teach validate.py (request fields are checked in
test_validate.py)."""

from __future__ import annotations

import typing
from typing import Any, get_args, get_origin

from openai.types.responses import response_includable, response_input_item_param, tool_param

from router_svc import vocabulary


def _literals(annotation: Any) -> set[str]:
    """Every string Literal reachable through unions, aliases and Required/Annotated wrappers."""
    found: set[str] = set()
    origin = get_origin(annotation)
    if origin is typing.Literal:
        return {a for a in get_args(annotation) if isinstance(a, str)}
    for arg in get_args(annotation):
        found |= _literals(arg)
    return found


def _union_members(alias: Any) -> list[Any]:
    members: list[Any] = []
    for arg in get_args(alias):
        if get_origin(arg) is typing.Union:
            members += _union_members(arg)
        else:
            members.append(arg)
    return members


def _type_values(alias: Any) -> set[str]:
    """The ``type`` literals of the TypedDicts of a union alias (ToolParam and the like)."""
    values: set[str] = set()
    for member in _union_members(alias):
        hints = getattr(member, "__annotations__", {})
        for name, hint in typing.get_type_hints(member, include_extras=True).items():
            if name == "type":
                values |= _literals(hint)
        if not hints:
            values |= _type_values(member)
    return values


def test_every_includable_value_of_the_sdk_is_known() -> None:
    sdk = set(get_args(response_includable.ResponseIncludable))
    assert sdk, "the SDK's ResponseIncludable moved: find it again"
    assert sdk - set(vocabulary.INCLUDABLE) == set(), "include values the gateway does not know"


def test_every_tool_type_of_the_sdk_is_known() -> None:
    sdk = _type_values(tool_param.ToolParam)
    assert {"function", "code_interpreter", "shell"} <= sdk, "the reader of ToolParam broke"
    assert sdk - set(vocabulary.TOOL_TYPES) == set(), "tool types the gateway does not know"


def test_every_input_item_type_of_the_sdk_is_known() -> None:
    sdk = _type_values(response_input_item_param.ResponseInputItemParam)
    assert {"message", "function_call", "item_reference"} <= sdk, "the reader broke"
    known = set(vocabulary.ITEM_TYPES)
    assert sdk - known == set(), "input item types the gateway does not know"
