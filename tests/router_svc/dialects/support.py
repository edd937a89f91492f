"""What every dialect's tests share: a parsed request, the SDK's strict check of a Response, a user
message, a declared function tool."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from openai._models import validate_type
from openai.types.responses import Response

from router_svc import inputs, validate


def req(**body: Any) -> validate.TurnRequest:
    return validate.parse_turn_request({"model": "m", **body})


def checked(response: Mapping[str, Any]) -> Response:
    """The response validated strictly against the openai SDK's Response model."""
    assert "output_text" not in response  # computed by the SDK, never on the wire
    return validate_type(type_=Response, value=response)


def user(text: str) -> dict[str, Any]:
    return inputs.normalize_items(text)[0]


# A function tool as the caller declares it.
FUNCTION = {
    "type": "function",
    "name": "weather",
    "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    "strict": True,
}
