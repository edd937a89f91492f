"""router_svc.include: a code_interpreter_call's outputs as each read is shown them."""

from __future__ import annotations

from typing import Any

from router_svc import include

OUTPUTS = [{"type": "logs", "logs": "hi"}]
MESSAGE = {"id": "msg_1", "type": "message", "role": "assistant", "content": []}


def call(outputs: Any = OUTPUTS) -> dict[str, Any]:
    return {"id": "ci_1", "type": "code_interpreter_call", "code": "1", "outputs": outputs}


def test_nothing_to_hide_returns_the_very_same_objects() -> None:
    plain = {"id": "resp_1", "output": [MESSAGE]}
    assert include.response(plain, ()) is plain
    assert include.response({"output": []}, ())["output"] == []
    asked = {"id": "resp_1", "output": [call()]}
    assert include.response(asked, [include.OUTPUTS]) is asked
    items = [MESSAGE, call(None)]
    assert include.items(items, ()) is items
    events = [{"type": "response.output_item.done", "item": MESSAGE}]
    assert include.events(events, plain, ()) is events


def test_outputs_hidden_without_touching_the_stored_objects() -> None:
    stored: dict[str, Any] = {"id": "resp_1", "output": [call(), MESSAGE]}
    shown = include.response(stored, ())
    assert shown["output"][0]["outputs"] is None and shown["output"][1] is MESSAGE
    assert stored["output"][0]["outputs"] == OUTPUTS


def test_events_take_the_outputs_from_the_stored_response() -> None:
    stored: dict[str, Any] = {"id": "resp_1", "output": [call(), MESSAGE]}
    logged = [
        {"type": "response.output_item.added", "item": call(None)},
        {"type": "response.output_item.done", "item": call(None)},
        {"type": "response.completed", "response": {"output": [call(None), MESSAGE]}},
    ]
    asked = list(include.events(logged, stored, [include.OUTPUTS]))
    assert asked[0]["item"]["outputs"] is None  # an item being added has none yet
    assert asked[1]["item"]["outputs"] == OUTPUTS
    assert asked[2]["response"]["output"][0]["outputs"] == OUTPUTS
    hidden = list(include.events([*logged[:1], *asked[1:]], stored, ()))
    assert hidden[1]["item"]["outputs"] is None
    assert hidden[2]["response"]["output"][0]["outputs"] is None
    assert include.hidden(asked[1], ())["item"]["outputs"] is None
    assert include.hidden(asked[1], [include.OUTPUTS]) is asked[1]
