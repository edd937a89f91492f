"""What a client is shown of a ``code_interpreter_call``'s ``outputs``: ``include`` decides.

As at OpenAI, a call's outputs (its logs, and the images it made) are always computed and stored
with the item, so that a later turn of the chain or conversation replays the call with what it
printed; a client sees them only where it asks with ``include=["code_interpreter_call.outputs"]``,
and ``outputs: null`` everywhere else: the POST answer, its stream events, ``GET
/v1/responses/{id}`` (and its stream replay), ``GET /v1/responses/{id}/input_items`` and the
conversation item endpoints (each takes ``include``).

Every function here returns its argument itself when there is nothing to hide, after a look at the
item types only, so a response without a code_interpreter_call costs a loop over its output items.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import Any

from starlette.requests import Request

from router_svc import checks, vocabulary
from router_svc.shapes import Item, ResponseObject, StreamEvent

OUTPUTS = "code_interpreter_call.outputs"
CALL = "code_interpreter_call"


def from_query(request: Request) -> tuple[str, ...]:
    """The ``include`` query parameter of a read: ``include[]=`` as the openai SDK sends it, or
    ``include=``, repeated; a value OpenAI does not know is a 400."""
    params = request.query_params
    values = (*params.getlist("include[]"), *params.getlist("include"))
    for value in values:
        if value not in vocabulary.INCLUDABLE:
            raise checks.invalid_value("include", value, vocabulary.INCLUDABLE)
    return values


def _hidden(item: Mapping[str, Any]) -> bool:
    return item.get("type") == CALL and item.get("outputs") is not None


def items(shown: list[Item], include: Collection[str]) -> list[Item]:
    """``shown`` with each call's outputs null unless ``include`` asks for them."""
    if OUTPUTS in include:
        return shown
    for item in shown:
        if _hidden(item):
            break
    else:
        return shown
    return [{**item, "outputs": None} if _hidden(item) else item for item in shown]


def response(shown: ResponseObject, include: Collection[str]) -> ResponseObject:
    """A Response object with each call's outputs null unless ``include`` asks for them."""
    output = shown.get("output")
    if not output or OUTPUTS in include:
        return shown
    for item in output:
        if item.get("type") == CALL and item.get("outputs") is not None:
            break
    else:
        return shown  # the common case: one look at each item's type
    return {**shown, "output": items(output, include)}


def events(
    stored: Iterable[StreamEvent], full: Mapping[str, Any], include: Collection[str]
) -> Iterable[StreamEvent]:
    """The stored events of the response ``full`` (as stored: the calls with their outputs) as
    a client asking with ``include`` is shown them. The events themselves may hold the outputs
    or not (they were sent as the creating request's ``include`` said): each call item of an
    ``output_item.done`` and of a response takes them from ``full``, or null."""
    outputs = {
        str(item.get("id")): item.get("outputs")
        for item in full.get("output") or ()
        if item.get("type") == CALL
    }
    if not outputs:
        return stored
    return _events(stored, outputs if OUTPUTS in include else {})


def _events(stored: Iterable[StreamEvent], outputs: Mapping[str, Any]) -> Iterator[StreamEvent]:
    for event in stored:
        item = event.get("item")
        if isinstance(item, dict) and item.get("type") == CALL:
            done = event.get("type") == "response.output_item.done"
            kept = outputs.get(str(item.get("id"))) if done else None
            event = {**event, "item": {**item, "outputs": kept}}
        answer = event.get("response")
        if isinstance(answer, dict) and any(
            i.get("type") == CALL for i in answer.get("output") or ()
        ):
            output = [
                {**i, "outputs": outputs.get(str(i.get("id")))} if i.get("type") == CALL else i
                for i in answer["output"]
            ]
            event = {**event, "response": {**answer, "output": output}}
        yield event


def hidden(event: StreamEvent, include: Collection[str]) -> StreamEvent:
    """A logged event with each call's outputs null unless ``include`` asks for them (when it
    asks, the event is shown as logged: it cannot bring back what its run left out)."""
    if OUTPUTS in include:
        return event
    return next(_events((event,), {}))
