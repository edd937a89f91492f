"""The gateway's vocabulary (router_svc/vocabulary.py) against the installed openai SDK's: a test
here fails when the SDK grows a request field, an ``include`` value, a tool type, a
``tool_choice`` form or an input item type the gateway does not know, so that upgrading the SDK
in the lock file shows what to teach the gateway (CONTRIBUTING, "Where a change goes")."""

from __future__ import annotations

import typing
from typing import Any, get_args, get_origin, get_type_hints

from openai.types.responses import (
    response_create_params,
    response_includable,
    response_input_item_param,
    tool_param,
)

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


def test_the_gateway_knows_every_field_of_the_installed_sdk() -> None:
    # Fails when the openai SDK grows a request field: teach validate (and translate) its meaning.
    fields = set(get_type_hints(response_create_params.ResponseCreateParamsBase))
    fields |= set(get_type_hints(response_create_params.ResponseCreateParamsStreaming))
    fields |= set(get_type_hints(response_create_params.ResponseCreateParamsNonStreaming))
    assert fields - vocabulary.REQUEST_FIELDS == set(), (
        "fields of the SDK the gateway does not know"
    )
    assert vocabulary.REQUEST_FIELDS - fields == set(), "fields the SDK no longer has"
    assert not vocabulary.REQUEST_FIELDS & vocabulary.HUB_SAMPLING_FIELDS


def test_every_tool_choice_of_the_sdk_is_known() -> None:
    members = _union_members(response_create_params.ToolChoice)
    options = set().union(*(_literals(m) for m in members if not isinstance(m, type)))
    assert options == {"none", "auto", "required"}, "the reader of ToolChoice broke"
    assert options - set(vocabulary.TOOL_CHOICE_OPTIONS) == set()
    sdk = {
        value
        for member in members
        if isinstance(member, type)
        for value in _literals(get_type_hints(member, include_extras=True)["type"])
    }
    assert {"function", "allowed_tools", "file_search", "shell"} <= sdk, "the reader broke"
    assert sdk - set(vocabulary.TOOL_CHOICE_TYPES) == set(), "tool_choice types not known"


def test_every_tool_type_has_a_fate_on_a_chat_hub() -> None:
    fates = [
        vocabulary.CHAT_OFFERED_TOOLS,
        vocabulary.CHAT_NOT_RUN_TOOLS,
        set(vocabulary.CHAT_HOSTED_REFUSED),
        set(vocabulary.CHAT_CLIENT_REFUSED),
    ]
    assert set(vocabulary.TOOL_TYPES) == set().union(*fates)
    assert sum(map(len, fates)) == len(vocabulary.TOOL_TYPES), "one fate each"


def test_every_stored_item_type_has_an_id_prefix_of_its_own() -> None:
    prefixes = list(vocabulary.ID_PREFIXES.values())
    assert len(set(prefixes)) == len(prefixes)
    assert "item_reference" not in vocabulary.ID_PREFIXES, "a reference is never stored"


def test_the_container_memory_limits_are_the_sdks() -> None:
    from openai.types.container_create_params import ContainerCreateParams
    from openai.types.responses.container_auto import ContainerAuto
    from openai.types.responses.tool import CodeInterpreterContainerCodeInterpreterToolAuto

    for hint in (
        get_type_hints(ContainerCreateParams)["memory_limit"],
        ContainerAuto.model_fields["memory_limit"].annotation,
        CodeInterpreterContainerCodeInterpreterToolAuto.model_fields["memory_limit"].annotation,
    ):
        literals = [hint, *get_args(hint)]
        literal = next(a for a in literals if get_origin(a) is typing.Literal)
        assert set(get_args(literal)) == set(vocabulary.CONTAINER_MEMORY_LIMITS)


def test_the_shell_environments_are_the_sdks() -> None:
    from openai.types.responses.function_shell_tool_param import Environment

    types = {get_type_hints(member)["type"] for member in get_args(Environment)}
    assert {get_args(t)[0] for t in types} == set(vocabulary.SHELL_ENVIRONMENTS)
