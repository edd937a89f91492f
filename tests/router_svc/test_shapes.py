"""The router's JSON shapes (router_svc/shapes.py) against the installed openai SDK's models: a test
here fails when a TypedDict names a key the SDK's Response, ResponseError or stream event models
do not have (a typo, or a key the SDK dropped), and when the SDK's Response grows a field the
gateway's Response object does not name, so that upgrading the SDK shows what to echo."""

from __future__ import annotations

import typing
from typing import get_args, get_origin

from openai import BaseModel
from openai.types.responses import Response, ResponseError, ResponseStreamEvent

from router_svc import shapes, validate
from router_svc.response import response_object

# Keys the gateway sends as OpenAI does although the SDK's models do not name them.
BEYOND_THE_SDK_RESPONSE = {"store", "presence_penalty", "frequency_penalty"}
BEYOND_THE_SDK_EVENTS = {"name"}  # response.function_call_arguments.done names its function
# Fields of the SDK's Response the gateway does not echo.
NOT_ECHOED = {"input_transformations", "tool_usage"}


def _wire_names(model: type[BaseModel]) -> set[str]:
    return {field.alias or name for name, field in model.model_fields.items()}


def _event_models() -> list[type[BaseModel]]:
    union = ResponseStreamEvent
    while get_origin(union) is typing.Annotated:
        union = get_args(union)[0]
    models = [m for m in get_args(union) if isinstance(m, type) and issubclass(m, BaseModel)]
    assert len(models) > 40, "the reader of ResponseStreamEvent broke"
    return models


def test_response_object_names_only_the_sdks_keys() -> None:
    named = set(typing.get_type_hints(shapes.ResponseObject))
    assert {"id", "output", "status", "usage"} <= named
    assert named - _wire_names(Response) == BEYOND_THE_SDK_RESPONSE


def test_response_object_names_every_field_of_the_sdks_response() -> None:
    # Fails when the SDK's Response grows a field: echo it (router_svc/response.py) and name it.
    named = set(typing.get_type_hints(shapes.ResponseObject))
    assert _wire_names(Response) - named == NOT_ECHOED


def test_response_error_names_only_the_sdks_keys() -> None:
    named = set(typing.get_type_hints(shapes.ResponseError))
    assert named == {"code", "message"}
    assert named <= _wire_names(ResponseError)


def test_stream_event_names_only_keys_of_the_sdks_events() -> None:
    named = set(typing.get_type_hints(shapes.StreamEvent))
    sdk = set().union(*(_wire_names(m) for m in _event_models()))
    assert {"type", "sequence_number", "response", "item", "delta"} <= named
    assert named - sdk == BEYOND_THE_SDK_EVENTS
    assert set(typing.get_type_hints(shapes.EventFields)) == named - {"type", "sequence_number"}


def test_the_response_object_made_has_only_named_keys() -> None:
    req = validate.parse_turn_request({"model": "m", "input": "hi", "prompt_cache_options": {}})
    made = response_object(req, response_id="resp_1", created_at=1, status="completed", output=[])
    assert set(made) == set(typing.get_type_hints(shapes.ResponseObject))
