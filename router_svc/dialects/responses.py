"""The responses dialect: a hub that speaks the Responses API itself (POST {hub}/responses).

The hub is used statelessly: the gateway keeps the history and stores the turn, and sends the hub
the whole input with ``store`` false (:func:`responses_request`); fields the gateway implements
itself (previous_response_id, conversation, store, background, stream) never reach it. Its answer
keeps its items (and their ids) under the gateway's response id and echo
(:func:`from_responses_result`), and its stream is re-emitted event for event with the gateway's
sequence numbers (:class:`ResponsesStreamTranslator`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from router_svc import errors, hub_shape
from router_svc.events import Translator, ended_early
from router_svc.inputs import user_message
from router_svc.response import NO_RESOURCES, error_object, response_object, with_id
from router_svc.shapes import Item, ResponseObject, StreamEvent
from router_svc.validate import TurnRequest
from router_svc.vocabulary import HUB_SAMPLING_FIELDS, REQUEST_FIELDS

_TERMINAL = ("response.completed", "response.incomplete", "response.failed")

# Fields of the caller's body that the gateway itself implements, so a Responses hub never sees
# them: the hub is used statelessly and the gateway stores the turn (and runs background turns).
_GATEWAY_FIELDS = frozenset(
    {
        "previous_response_id",
        "conversation",
        "store",
        "background",
        "background_options",
        "stream",
        "stream_options",
    }
)
# Sampling parameters whose zero changes nothing: a zero is not sent to a Responses hub, which
# (OpenAI's) may not know them.
_NEUTRAL_AT_ZERO = ("presence_penalty", "frequency_penalty")


# --- out: a Responses hub ------------------------------------------------------------------


def responses_request(
    req: TurnRequest,
    history: list[Item],
    injected: list[Item],
    *,
    stream: bool,
) -> dict[str, Any]:
    """The body for POST {hub}/responses: the hub is used statelessly (store false).

    The result shares nested values with the request; it is meant to be serialized, not mutated.
    """
    out: dict[str, Any] = {
        key: value
        for key, value in req.body.items()
        if key in REQUEST_FIELDS
        and key not in _GATEWAY_FIELDS
        and key not in ("model", "input", "instructions")
    }
    for key in HUB_SAMPLING_FIELDS:
        value = req.body.get(key)
        if value is not None and not (key in _NEUTRAL_AT_ZERO and value == 0):
            out[key] = value
    out["model"] = req.model
    out["input"] = [item for item in (*history, *injected, *req.input_items) if _replayable(item)]
    if req.instructions is not None:
        out["instructions"] = req.instructions
    out["store"] = False
    if stream:
        out["stream"] = True
        if req.body.get("stream_options") is not None:
            out["stream_options"] = req.body["stream_options"]
    return out


def _replayable(item: Mapping[str, Any]) -> bool:
    # With store false the hub cannot look a reasoning item up by id; only its encrypted content
    # lets it be replayed.
    return item.get("type") != "reasoning" or bool(item.get("encrypted_content"))


# --- back: a Responses hub -------------------------------------------------------------------


def from_responses_result(
    req: TurnRequest,
    upstream: dict[str, Any],
    *,
    response_id: str,
    created_at: int,
    tool_resources: Mapping[str, str] = NO_RESOURCES,
) -> ResponseObject:
    """A Responses hub's response as ours: our id and echo, the hub's items (with their ids)."""
    if not isinstance(upstream, dict):
        raise errors.UpstreamError(
            "The model server's answer is not a JSON object.", code=hub_shape.MALFORMED
        )
    hub_shape.check_response(upstream)
    output = upstream["output"]
    status = upstream.get("status") or "completed"
    completed_at = upstream.get("completed_at")
    return response_object(
        req,
        response_id=response_id,
        created_at=created_at,
        status=status,
        output=[with_id(item) for item in output],
        usage=upstream.get("usage"),
        error=upstream.get("error"),
        incomplete_details=upstream.get("incomplete_details"),
        tool_resources=tool_resources,
        completed_at=completed_at if isinstance(completed_at, int) else None,
        function_strict=_strict_by_name(upstream.get("tools")),
    )


def _strict_by_name(tools: Any) -> dict[str, bool]:
    """The strictness a Responses hub echoes for its function tools (OpenAI makes a function
    strict when it can, unless the caller said otherwise)."""
    out: dict[str, bool] = {}
    for tool in tools if isinstance(tools, list) else []:
        if (
            isinstance(tool, dict)
            and tool.get("type") == "function"
            and isinstance(tool.get("name"), str)
            and isinstance(tool.get("strict"), bool)
        ):
            out[tool["name"]] = tool["strict"]
    return out


# --- streaming: the hub's events -> ours -----------------------------------------------


class ResponsesStreamTranslator(Translator):
    """Re-emits a Responses hub's events as ours: our response id and echo, our sequence numbers.

    Items keep the hub's ids. The hub's own ``response.created`` / ``response.in_progress`` are
    replaced by ours from :meth:`start`; its terminal event becomes ours with our Response object.
    """

    def __init__(
        self,
        req: TurnRequest,
        *,
        response_id: str,
        created_at: int,
        tool_resources: Mapping[str, str] = NO_RESOURCES,
    ) -> None:
        super().__init__(
            req, response_id=response_id, created_at=created_at, tool_resources=tool_resources
        )
        self._items: dict[int, Item] = {}
        self._closed: set[int] = set()
        self._ids: dict[int, str] = {}  # ids given to items the hub sent without one

    def _response(self, status: str, output: list[Item], **extra: Any) -> ResponseObject:
        return response_object(
            self._req,
            response_id=self._id,
            created_at=self._created_at,
            status=status,
            output=output,
            tool_resources=self._resources,
            **extra,
        )

    @property
    def response(self) -> ResponseObject:
        """The Response object as it stands; final once the terminal event passed."""
        if self._final is not None:
            return self._final
        return self._response("in_progress", [self._items[i] for i in sorted(self._items)])

    def feed(self, event: dict[str, Any]) -> list[StreamEvent]:
        """Our events for one event of the hub's stream."""
        if self._final is not None:
            return []
        hub_shape.check_event(event)
        events = self.start()
        kind = event.get("type")
        if not isinstance(kind, str) or kind in (
            "response.created",
            "response.in_progress",
            "response.queued",
        ):
            return events
        if kind in _TERMINAL:
            upstream = event.get("response")
            if isinstance(upstream, dict) and upstream.get("output") is not None:
                hub_shape.check_response(upstream)  # before items of the wrong type are dropped
            if not isinstance(upstream, dict) or not isinstance(upstream.get("output"), list):
                upstream = {**(upstream if isinstance(upstream, dict) else {}), "output": []}
            upstream = {**upstream, "output": self._with_ids(upstream["output"])}
            if kind == "response.completed":
                upstream.setdefault("status", "completed")
            self._final = from_responses_result(
                self._req,
                upstream,
                response_id=self._id,
                created_at=self._created_at,
                tool_resources=self._resources,
            )
            events.append(self._events.make(kind, response=self._final))
            return events
        out = {k: v for k, v in event.items() if k not in ("type", "sequence_number")}
        index = event.get("output_index")
        if kind in ("response.output_item.added", "response.output_item.done") and isinstance(
            index, int
        ):
            item = event.get("item")
            if isinstance(item, dict):
                item = self._item_with_id(index, item)
                out["item"] = item
                self._items[index] = item
                if kind == "response.output_item.done":
                    self._closed.add(index)
        elif isinstance(index, int) and index in self._ids and "item_id" in out:
            out["item_id"] = self._ids[index]
        events.append(self._events.make(kind, **out))
        return events

    def _item_with_id(self, index: int, item: Item) -> Item:
        if item.get("id"):
            return item
        if index not in self._ids:
            self._ids[index] = with_id(item)["id"]
        return {"id": self._ids[index], **item}

    def _with_ids(self, output: list[Any]) -> list[Item]:
        return [
            self._item_with_id(i, item) if i in self._ids else with_id(item)
            for i, item in enumerate(output)
            if isinstance(item, dict)
        ]

    def finish(self) -> list[StreamEvent]:
        """Nothing after the hub's terminal event. Raises :class:`errors.UpstreamError` (code
        :data:`STREAM_INCOMPLETE`) when the hub's stream ended without one; the caller then
        answers :meth:`fail`."""
        if self._final is not None:
            return []
        raise ended_early("no response.completed, response.incomplete or response.failed")

    def fail(self, code: str, message: str) -> list[StreamEvent]:
        if self._final is not None:
            return []
        events = self.start()
        output = []
        for index in sorted(self._items):
            item = self._items[index]
            if index not in self._closed and "status" in item:
                item = {**item, "status": "incomplete"}
            output.append(item)
        self._final = self._response("failed", output, error=error_object(code, message))
        events.append(self._events.make("error", code=code, message=message, param=None))
        events.append(self._events.make("response.failed", response=self._final))
        return events


# --- the dialect ---------------------------------------------------------------------------


class ResponsesDialect:
    """A Responses API hub (:class:`router_svc.dialects.Dialect`)."""

    name = "responses"
    path = "/responses"
    tool_loop = False
    seals_reasoning = False
    own_compaction = True

    def refuse(self, req: TurnRequest) -> None:
        """Nothing: the hub itself refuses what it cannot do (prompt templates, hosted tools)."""

    def request(
        self,
        req: TurnRequest,
        history: list[Item],
        injected: list[Item],
        *,
        stream: bool,
    ) -> dict[str, Any]:
        return responses_request(req, history, injected, stream=stream)

    def result(
        self,
        req: TurnRequest,
        answer: Any,
        *,
        response_id: str,
        created_at: int,
        tool_resources: Mapping[str, str],
    ) -> ResponseObject:
        return from_responses_result(
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
    ) -> ResponsesStreamTranslator:
        # The hub mints its reasoning's encrypted_content itself: nothing is sealed here.
        return ResponsesStreamTranslator(
            req, response_id=response_id, created_at=created_at, tool_resources=tool_resources
        )

    def summary_request(
        self, model: str, items: list[Item], instructions: str | None, prompt: str
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "input": [*items, user_message(prompt)],
            "store": False,
        }
        if instructions:
            body["instructions"] = instructions
        return body

    def summary(self, answer: Any) -> tuple[object, dict[str, Any] | None]:
        text = "".join(
            str(part.get("text", ""))
            for item in answer.get("output") or []
            if isinstance(item, dict) and item.get("type") == "message"
            for part in item.get("content") or []
            if isinstance(part, dict)
        )
        usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else None
        return text, usage
