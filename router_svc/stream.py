"""Responses API streaming events: from Chat Completions chunks, from a Responses hub, and replayed.

Every sequence starts with ``response.created`` and ``response.in_progress``; ``sequence_number``
starts at 0 and grows by one per event. Each output item is opened with
``response.output_item.added`` and closed with ``response.output_item.done`` before the next one
opens, keeps its id and ``output_index`` throughout, and is followed by the terminal event:
``response.completed``, ``response.incomplete`` (the hub hit max tokens or its content filter),
or ``error`` then ``response.failed``. Items still open when a stream fails are not closed: the
failed response carries them with status ``incomplete``. The SSE stream the client gets ends with
:data:`SSE_DONE` after that, as OpenAI's does.

A hub's stream is finished only when the hub said so: a chat stream by a ``finish_reason`` in its
choice, a Responses stream by its terminal event. A stream that ends without it (a model server
that stopped or was restarted mid-answer and closed the connection cleanly, with or without
``[DONE]``) is an early end: ``finish()`` raises :class:`errors.UpstreamError` with code
:data:`STREAM_INCOMPLETE`, the caller answers ``response.failed`` (:meth:`fail`), and the partial
answer is never stored as ``completed`` (nor as ``incomplete``, whose reasons say the model stopped
on purpose), so no later turn builds on it.

:func:`replay_events` rebuilds that sequence from a stored response, event type for event type,
with one delta per content part (the stored response does not keep the hub's chunk boundaries).
"""

from __future__ import annotations

import base64
import copy
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from router_svc import errors, hub_shape, translate
from router_svc.ids import new_id
from router_svc.inputs import output_text
from router_svc.translate import NO_RESOURCES
from router_svc.validate import TurnRequest

_TERMINAL = ("response.completed", "response.incomplete", "response.failed")

# The error code of a hub stream that ended before the hub said it had finished.
STREAM_INCOMPLETE = "upstream_stream_incomplete"

# finish_reason values that say the hub stopped without finishing the answer: vLLM and SGLang end an
# aborted request's stream (engine shutdown, preemption, an abort) with "abort", then [DONE].
_ABORTED = frozenset({"abort", "error"})

# The last bytes of every SSE stream the router sends, after its terminal event (as OpenAI ends its
# streams); the openai SDK stops reading there.
SSE_DONE = b"data: [DONE]\n\n"


def sse_encode(event: dict[str, Any]) -> bytes:
    """One server-sent event whose ``event:`` line is the event's type."""
    # One copy of the event's JSON, not one per concatenation: a terminal event holds the answer.
    return b"".join(
        (b"event: ", str(event["type"]).encode(), b"\ndata: ", orjson.dumps(event), b"\n\n")
    )


def sse_pieces(event: dict[str, Any]) -> tuple[bytes, ...]:
    """The bytes of :func:`sse_encode`, in three pieces when the event is large (a ``.done`` or
    terminal event of a long answer), so that its JSON is not copied once more to join them."""
    data = orjson.dumps(event)
    if len(data) < _LARGE_EVENT:
        return (b"".join((b"event: ", str(event["type"]).encode(), b"\ndata: ", data, b"\n\n")),)
    return (b"event: " + str(event["type"]).encode() + b"\ndata: ", data, b"\n\n")


_LARGE_EVENT = 64 * 1024


def _ended_early(detail: str) -> errors.UpstreamError:
    return errors.UpstreamError(
        f"The model server ended the stream before the answer was finished ({detail}).",
        code=STREAM_INCOMPLETE,
    )


class _Events:
    """Numbers the events of one stream."""

    def __init__(self) -> None:
        self.next = 0

    def make(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.next, **fields}
        self.next += 1
        return event


class _Text:
    """Text that arrives in pieces. A str object costs 49 bytes more than its text, so a piece per
    few-byte delta would cost many times the answer: pieces are joined into blocks of
    :data:`_BLOCK` as they come, and into one string when read."""

    __slots__ = ("_blocks", "_pieces")

    def __init__(self) -> None:
        self._blocks: list[str] = []
        self._pieces: list[str] = []

    def append(self, piece: str) -> None:
        self._pieces.append(piece)
        if len(self._pieces) >= _BLOCK:
            self._blocks.append("".join(self._pieces))
            self._pieces.clear()

    def value(self) -> str:
        if self._pieces or len(self._blocks) != 1:
            # Kept as the one block, so that the text is not held twice.
            self._blocks = ["".join([*self._blocks, *self._pieces])]
            self._pieces.clear()
        return self._blocks[0]


_BLOCK = 256


@dataclass
class _Part:
    """An open content part; its text is kept in pieces and joined when read."""

    data: dict[str, Any]  # the part inside its item's "content"
    key: str  # "text" or "refusal"
    pieces: _Text = field(default_factory=_Text)

    def render(self) -> None:
        self.data[self.key] = self.pieces.value()


@dataclass
class _Item:
    """An output item being streamed."""

    index: int
    data: dict[str, Any]  # the item inside the response's output
    parts: list[_Part] = field(default_factory=list)
    arguments: _Text = field(default_factory=_Text)
    call: _Call | None = None  # the chat tool call a function_call item streams

    def render(self) -> None:
        for part in self.parts:
            part.render()
        if self.data["type"] == "function_call":
            self.data["arguments"] = self.arguments.value()
        elif self.data["type"] == "custom_tool_call":
            self.data["input"] = translate.custom_input(self.arguments.value())


@dataclass
class _Call:
    """A tool call of the chat stream, by its chunk index; added once its name is known."""

    call_id: str = ""
    name: str = ""
    pending: list[str] = field(default_factory=list)
    item: _Item | None = None
    closed: bool = False


class _Translator:
    """What both translators share: the request, the response's identity and echo, the event
    numbering, and the two events every stream opens with."""

    def __init__(
        self,
        req: TurnRequest,
        *,
        response_id: str,
        created_at: int,
        tool_resources: Mapping[str, str] = NO_RESOURCES,
    ) -> None:
        self._req = req
        self._id = response_id
        self._created_at = created_at
        self._resources = dict(tool_resources)
        self._events = _Events()
        self._started = False
        self._final: dict[str, Any] | None = None

    def start(self) -> list[dict[str, Any]]:
        """``response.created`` and ``response.in_progress``."""
        if self._started:
            return []
        self._started = True
        snapshot = translate.response_object(
            self._req,
            response_id=self._id,
            created_at=self._created_at,
            status="in_progress",
            output=[],
            tool_resources=self._resources,
        )
        return [
            self._events.make("response.created", response=snapshot),
            self._events.make("response.in_progress", response=copy.copy(snapshot)),
        ]


class ChatStreamTranslator(_Translator):
    """Turns the chunks of one streamed chat completion into Responses streaming events."""

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
        self._output: list[dict[str, Any]] = []
        # The names the hub knows the declared tools by (namespace functions, custom tools).
        self._toolset = translate.ChatToolset(req.tools)
        self._open: list[_Item] = []  # the item being streamed (a call joins once named)
        self._calls: dict[int, _Call] = {}
        self._last_call: int | None = None
        self._finish_reason: str | None = None
        self._usage: dict[str, Any] | None = None
        self._logprobs = translate.LOGPROBS_INCLUDE in req.include
        # Seals a reasoning item's text into its encrypted_content when the item is done (set by
        # the turn when the client asked for reasoning.encrypted_content); None: no sealing.
        self.seal_reasoning: Callable[[str], str] | None = None

    # -- the Response object

    def _response(self, status: str, **extra: Any) -> dict[str, Any]:
        return translate.response_object(
            self._req,
            response_id=self._id,
            created_at=self._created_at,
            status=status,
            output=self._output,
            usage=self._usage,
            tool_resources=self._resources,
            **extra,
        )

    @property
    def response(self) -> dict[str, Any]:
        """The Response object as it stands; final once finish() or fail() ran."""
        if self._final is not None:
            return self._final
        for item in self._open:
            item.render()
        return self._response("in_progress")

    # -- lifecycle

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        """The events for one parsed ``chat.completion.chunk``."""
        if self._final is not None:
            return []
        hub_shape.check_chunk(chunk)
        events = self.start()
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._usage = translate.usage_from_chat(usage)
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            reasoning = translate.chat_reasoning(delta)
            if reasoning:
                events += self._part_delta("reasoning", "reasoning_text", reasoning, None)
            content = delta.get("content")
            if isinstance(content, str) and content:
                logprobs = None
                if self._logprobs:
                    logprobs = translate.chat_logprobs(
                        (choice.get("logprobs") or {}).get("content")
                    )
                events += self._part_delta("message", "output_text", content, logprobs)
            refusal = delta.get("refusal")
            if isinstance(refusal, str) and refusal:
                events += self._part_delta("message", "refusal", refusal, None)
            for call in delta.get("tool_calls") or []:
                if isinstance(call, dict):
                    events += self._call_delta(call)
            finish_reason = choice.get("finish_reason")
            if isinstance(finish_reason, str) and finish_reason:
                self._finish_reason = finish_reason
        return events

    def finish(self) -> list[dict[str, Any]]:
        """The hub's stream ended: closes the open items, then ``response.completed`` (any
        finish_reason that says the answer is whole: stop, tool_calls, ...) or
        ``response.incomplete`` (length, content_filter).

        Raises :class:`errors.UpstreamError` (code :data:`STREAM_INCOMPLETE`) when the hub never
        sent a finish_reason, or sent one that says it gave up (abort, error); the caller then
        answers :meth:`fail`.
        """
        if self._final is not None:
            return []
        if not self._finish_reason:
            raise _ended_early("no finish_reason")
        if self._finish_reason in _ABORTED:
            raise _ended_early(f"finish_reason {self._finish_reason!r}")
        events = self.start()
        reason = translate.INCOMPLETE_REASONS.get(self._finish_reason)
        events += self._close_all(last_status="incomplete" if reason else "completed")
        if reason is None:
            self._final = self._response("completed")
            events.append(self._events.make("response.completed", response=self._final))
        else:
            self._final = self._response("incomplete", incomplete_details={"reason": reason})
            events.append(self._events.make("response.incomplete", response=self._final))
        return events

    def fail(self, code: str, message: str) -> list[dict[str, Any]]:
        """An ``error`` event and ``response.failed``; open items stay open, as incomplete."""
        if self._final is not None:
            return []
        events = self.start()
        for call in self._calls.values():
            if call.item is None and not call.closed:
                events += self._add_call(call)
        for item in self._open:
            item.render()
            item.data["status"] = "incomplete"
        self._open = []
        self._final = self._response("failed", error=translate.error_object(code, message))
        events.append(self._events.make("error", code=code, message=message, param=None))
        events.append(self._events.make("response.failed", response=self._final))
        return events

    # -- compaction (router_svc.compaction), before the hub is called

    def open_compaction(self, item_id: str) -> list[dict[str, Any]]:
        """A compaction item is being made: ``response.output_item.added`` and
        ``response.compaction.compacting``."""
        events = self.start()
        index = len(self._output)
        item = {"id": item_id, "type": "compaction", "encrypted_content": ""}
        self._output.append(item)
        events.append(
            self._events.make("response.output_item.added", output_index=index, item=dict(item))
        )
        events.append(
            self._events.make("response.compaction.compacting", item_id=item_id, output_index=index)
        )
        return events

    def close_compaction(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        """The compaction item is made: ``response.output_item.done``."""
        index = next(i for i, data in enumerate(self._output) if data.get("id") == item["id"])
        self._output[index] = item
        return [self._events.make("response.output_item.done", output_index=index, item=dict(item))]

    # -- items

    def _add(self, data: dict[str, Any]) -> tuple[_Item, dict[str, Any]]:
        item = _Item(index=len(self._output), data=data)
        self._output.append(data)
        self._open.append(item)
        event = self._events.make(
            "response.output_item.added", output_index=item.index, item=copy.deepcopy(data)
        )
        return item, event

    def _close_all(self, *, last_status: str = "completed") -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for call in self._calls.values():
            if call.item is None and not call.closed:
                events += self._add_call(call)
        last = len(self._output) - 1
        for item in list(self._open):
            status = last_status if item.index == last else "completed"
            events += self._close(item, status)
        return events

    def _close(self, item: _Item, status: str) -> list[dict[str, Any]]:
        self._open.remove(item)
        if item.call is not None:
            item.call.closed = True
        item.render()
        events: list[dict[str, Any]] = []
        data = item.data
        if data["type"] == "function_call":
            events.append(
                self._events.make(
                    "response.function_call_arguments.done",
                    item_id=data["id"],
                    output_index=item.index,
                    name=data["name"],
                    arguments=data["arguments"],
                )
            )
        elif data["type"] == "custom_tool_call":
            # The hub streams a JSON object around the input: it goes out whole, once decoded.
            common = {"item_id": data["id"], "output_index": item.index}
            events.append(
                self._events.make(
                    "response.custom_tool_call_input.delta", **common, delta=data["input"]
                )
            )
            events.append(
                self._events.make(
                    "response.custom_tool_call_input.done", **common, input=data["input"]
                )
            )
        elif item.parts:
            events += self._close_part(item, len(item.parts) - 1)
        if data["type"] == "reasoning" and self.seal_reasoning is not None:
            _seal(data, self.seal_reasoning)
        data["status"] = status
        events.append(
            self._events.make(
                "response.output_item.done", output_index=item.index, item=copy.deepcopy(data)
            )
        )
        return events

    def _close_part(self, item: _Item, content_index: int) -> list[dict[str, Any]]:
        part = item.parts[content_index]
        part.render()
        common = {"item_id": item.data["id"], "output_index": item.index}
        kind = part.data["type"]
        if kind == "output_text":
            done = self._events.make(
                "response.output_text.done",
                **common,
                content_index=content_index,
                text=part.data["text"],
                logprobs=list(part.data["logprobs"]),
            )
        elif kind == "refusal":
            done = self._events.make(
                "response.refusal.done",
                **common,
                content_index=content_index,
                refusal=part.data["refusal"],
            )
        else:
            done = self._events.make(
                "response.reasoning_text.done",
                **common,
                content_index=content_index,
                text=part.data["text"],
            )
        return [
            done,
            self._events.make(
                "response.content_part.done",
                **common,
                content_index=content_index,
                part=copy.deepcopy(part.data),
            ),
        ]

    def _part_delta(
        self, item_type: str, part_type: str, text: str, logprobs: list[dict[str, Any]] | None
    ) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        item = self._open[-1] if self._open else None
        if item is None or item.data["type"] != item_type:
            events += self._close_all()
            if item_type == "message":
                data = translate.message_item([], status="in_progress")
            else:
                data = translate.reasoning_item("", status="in_progress")
                data["content"] = []
            item, added = self._add(data)
            events.append(added)
        if not item.parts or item.parts[-1].data["type"] != part_type:
            if item.parts:
                events += self._close_part(item, len(item.parts) - 1)
            if part_type == "output_text":
                part = _Part(output_text(""), "text")
            elif part_type == "refusal":
                part = _Part({"type": "refusal", "refusal": ""}, "refusal")
            else:
                part = _Part({"type": "reasoning_text", "text": ""}, "text")
            item.data["content"].append(part.data)
            item.parts.append(part)
            events.append(
                self._events.make(
                    "response.content_part.added",
                    item_id=item.data["id"],
                    output_index=item.index,
                    content_index=len(item.parts) - 1,
                    part=copy.deepcopy(part.data),
                )
            )
        part = item.parts[-1]
        part.pieces.append(text)
        common = {
            "item_id": item.data["id"],
            "output_index": item.index,
            "content_index": len(item.parts) - 1,
        }
        if part_type == "output_text":
            entries = logprobs or []
            part.data["logprobs"].extend(entries)
            events.append(
                self._events.make(
                    "response.output_text.delta", **common, delta=text, logprobs=entries
                )
            )
        elif part_type == "refusal":
            events.append(self._events.make("response.refusal.delta", **common, delta=text))
        else:
            events.append(self._events.make("response.reasoning_text.delta", **common, delta=text))
        return events

    def _call_delta(self, delta: dict[str, Any]) -> list[dict[str, Any]]:
        index = delta.get("index")
        if not isinstance(index, int) or isinstance(index, bool):
            index = self._implicit_index(delta.get("id"))
        function = delta.get("function") or {}
        events: list[dict[str, Any]] = []
        call = self._calls.get(index)
        if call is None:
            events += self._close_all()
            call = self._calls[index] = _Call()
            self._last_call = index
        elif call.closed:
            raise errors.UpstreamError(
                "The model server interleaved the deltas of parallel tool calls, which this "
                "gateway cannot stream."
            )
        if isinstance(delta.get("id"), str) and delta["id"] and not call.call_id:
            call.call_id = delta["id"]
        name = function.get("name")
        if isinstance(name, str) and name and not call.name:
            call.name = name
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            call.pending.append(arguments)
        if call.item is None and call.name:
            return events + self._add_call(call)
        if call.item is not None and call.pending:
            events += self._flush_arguments(call.item, call.pending)
        return events

    def _implicit_index(self, call_id: object) -> int:
        # Hubs that leave the index out send one call at a time: a new id starts a new call.
        last = self._last_call
        if last is None:
            return 0
        known = self._calls[last].call_id
        if isinstance(call_id, str) and call_id and known not in ("", call_id):
            return last + 1
        return last

    def _add_call(self, call: _Call) -> list[dict[str, Any]]:
        data = self._toolset.call_item(
            call_id=call.call_id or new_id("call"),
            chat_name=call.name,
            arguments="",
            status="in_progress",
        )
        item, added = self._add(data)
        item.call = call
        call.item = item
        return [added, *self._flush_arguments(item, call.pending)]

    def _flush_arguments(self, item: _Item, pending: list[str]) -> list[dict[str, Any]]:
        if not pending:
            return []
        text = "".join(pending)
        pending.clear()
        item.arguments.append(text)
        if item.data["type"] != "function_call":
            return []  # a custom tool's input goes out decoded, when the call closes
        return [
            self._events.make(
                "response.function_call_arguments.delta",
                item_id=item.data["id"],
                output_index=item.index,
                delta=text,
            )
        ]


def _seal(data: dict[str, Any], seal: Callable[[str], str]) -> None:
    data["encrypted_content"] = seal("".join(p.get("text", "") for p in data.get("content") or []))


class ResponsesStreamTranslator(_Translator):
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
        self._items: dict[int, dict[str, Any]] = {}
        self._closed: set[int] = set()
        self._ids: dict[int, str] = {}  # ids given to items the hub sent without one

    def _response(self, status: str, output: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return translate.response_object(
            self._req,
            response_id=self._id,
            created_at=self._created_at,
            status=status,
            output=output,
            tool_resources=self._resources,
            **extra,
        )

    @property
    def response(self) -> dict[str, Any]:
        """The Response object as it stands; final once the terminal event passed."""
        if self._final is not None:
            return self._final
        return self._response("in_progress", [self._items[i] for i in sorted(self._items)])

    def feed(self, event: dict[str, Any]) -> list[dict[str, Any]]:
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
            self._final = translate.from_responses_result(
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

    def _item_with_id(self, index: int, item: dict[str, Any]) -> dict[str, Any]:
        if item.get("id"):
            return item
        if index not in self._ids:
            self._ids[index] = translate.with_id(item)["id"]
        return {"id": self._ids[index], **item}

    def _with_ids(self, output: list[Any]) -> list[dict[str, Any]]:
        return [
            self._item_with_id(i, item) if i in self._ids else translate.with_id(item)
            for i, item in enumerate(output)
            if isinstance(item, dict)
        ]

    def finish(self) -> list[dict[str, Any]]:
        """Nothing after the hub's terminal event. Raises :class:`errors.UpstreamError` (code
        :data:`STREAM_INCOMPLETE`) when the hub's stream ended without one; the caller then
        answers :meth:`fail`."""
        if self._final is not None:
            return []
        raise _ended_early("no response.completed, response.incomplete or response.failed")

    def fail(self, code: str, message: str) -> list[dict[str, Any]]:
        if self._final is not None:
            return []
        events = self.start()
        output = []
        for index in sorted(self._items):
            item = self._items[index]
            if index not in self._closed and "status" in item:
                item = {**item, "status": "incomplete"}
            output.append(item)
        self._final = self._response("failed", output, error=translate.error_object(code, message))
        events.append(self._events.make("error", code=code, message=message, param=None))
        events.append(self._events.make("response.failed", response=self._final))
        return events


# --- replay ----------------------------------------------------------------------------------

# The stored event log (StoredResponse.stream_events_json) of a streamed turn is a JSON array of
# the events as they were sent, in a compact form that :func:`expand_log` turns back into exactly
# those events, given the response stored with them:
#
# - a run of consecutive deltas of one text (same type, item, part; no logprobs) is one record: the
#   first delta with its "delta" emptied and LOG_DELTAS, the length of each delta in characters
#   (unsigned LEB128 varints, base64-encoded: a byte per delta of up to 127 characters); their
#   text is the stored response's (output_text, refusal and reasoning text, a summary's text, a
#   function call's arguments), in order;
# - an event whose text or object is in the stored response as it was sent (the ``.done`` events,
#   the terminal event's response) has that member nulled and named by LOG_FROM.
#
# Any other event is stored as it was. A few-byte delta costs about 150 bytes as an event, so a log
# of every event as sent cost tens of times the answer (issue 13); this one costs about a byte per
# delta. An older log (every event whole) is read unchanged.
LOG_DELTAS = "respgw_deltas"
LOG_FROM = "respgw_from"

# Where the text of a delta or done event is in the response: the member of the event, and the
# path of the value in response["output"][output_index].
_TEXT_OF: dict[str, tuple[str, tuple[str, ...]]] = {
    "response.output_text.delta": ("delta", ("content", "content_index", "text")),
    "response.output_text.done": ("text", ("content", "content_index", "text")),
    "response.refusal.delta": ("delta", ("content", "content_index", "refusal")),
    "response.refusal.done": ("refusal", ("content", "content_index", "refusal")),
    "response.reasoning_text.delta": ("delta", ("content", "content_index", "text")),
    "response.reasoning_text.done": ("text", ("content", "content_index", "text")),
    "response.reasoning_summary_text.delta": ("delta", ("summary", "summary_index", "text")),
    "response.reasoning_summary_text.done": ("text", ("summary", "summary_index", "text")),
    "response.function_call_arguments.delta": ("delta", ("arguments",)),
    "response.function_call_arguments.done": ("arguments", ("arguments",)),
    "response.content_part.done": ("part", ("content", "content_index")),
    "response.reasoning_summary_part.done": ("part", ("summary", "summary_index")),
    "response.output_item.done": ("item", ()),
}
# The members a delta of a run may have (any other, such as a hub's "obfuscation", differs from
# delta to delta: such deltas are stored whole).
_RUN_KEYS = frozenset(
    {
        "type",
        "sequence_number",
        "item_id",
        "output_index",
        "content_index",
        "summary_index",
        "delta",
        "logprobs",
    }
)
_WHOLE = frozenset({"response.completed", "response.incomplete", "response.failed"})


def _in_response(response: dict[str, Any], event: dict[str, Any]) -> tuple[str, Any] | None:
    """The member of ``event`` the response holds, and its value there; None when it has none."""
    kind = event["type"]
    if kind in _WHOLE:
        return "response", response
    where = _TEXT_OF.get(kind)
    if where is None:
        return None
    member, path = where
    try:
        value: Any = response["output"][event["output_index"]]
        i = 0
        while i < len(path):
            if i + 1 < len(path) and path[i + 1].endswith("_index"):
                value = value[path[i]][event[path[i + 1]]]
                i += 2
            else:
                value = value[path[i]]
                i += 1
    except (KeyError, IndexError, TypeError):
        return None
    return member, value


class _Run:
    """Consecutive deltas of one text: the first event, each length, and a CRC of the text."""

    __slots__ = ("chars", "crc", "first", "lengths", "next")

    def __init__(self, first: dict[str, Any]) -> None:
        self.first = first
        self.lengths = bytearray()
        self.chars = 0
        self.crc = 0
        self.next = int(first["sequence_number"])
        self.add(first["delta"])

    def extends(self, event: dict[str, Any]) -> bool:
        first = self.first
        # The first delta's members are all in _RUN_KEYS: the same members, the same values but
        # the number and the text.
        return (
            event["sequence_number"] == self.next
            and event["type"] == first["type"]
            and event.keys() == first.keys()
            and event.get("output_index") == first.get("output_index")
            and event.get("content_index") == first.get("content_index")
            and event.get("summary_index") == first.get("summary_index")
            and event.get("item_id") == first.get("item_id")
            and event.get("logprobs") == first.get("logprobs")
        )

    def add(self, delta: str) -> None:
        n = len(delta)
        self.chars += n
        if n < 0x80:
            self.lengths.append(n)
            self.crc = zlib.crc32(delta.encode(), self.crc)
            self.next += 1
            return
        while n > 0x7F:
            self.lengths.append(0x80 | (n & 0x7F))
            n >>= 7
        self.lengths.append(n)
        self.crc = zlib.crc32(delta.encode(), self.crc)
        self.next += 1


def _lengths(encoded: str) -> Iterator[int]:
    n = shift = 0
    for byte in base64.b64decode(encoded):
        n |= (byte & 0x7F) << shift
        if byte & 0x80:
            shift += 7
        else:
            yield n
            n = shift = 0


# A stream of fewer events, with fewer characters of deltas, is stored as its events.
PLAIN_EVENTS = 256
PLAIN_CHARS = 64 * 1024


class EventLog:
    """The events of a streamed turn as they are sent, kept for its stored log (see LOG_DELTAS):
    deltas as their lengths and a checksum, other events as they are (their texts are shared
    with the response being built, not copied)."""

    def __init__(self, *, compact: bool = False) -> None:
        # A short stream is kept as its events, stored as they are (what it costs is little,
        # and the compact form costs CPU per event); past PLAIN_EVENTS events or PLAIN_CHARS
        # characters of deltas (or from the start, with ``compact``), in the compact form.
        self._plain: list[dict[str, Any]] | None = None if compact else []
        self._chars = 0
        self._records: list[dict[str, Any] | _Run] = []
        self._run: _Run | None = None

    def add(self, event: dict[str, Any]) -> None:
        plain = self._plain
        if plain is None:
            self._add(event)
            return
        plain.append(event)
        delta = event.get("delta")
        if isinstance(delta, str):
            self._chars += len(delta)
        if len(plain) >= PLAIN_EVENTS or self._chars >= PLAIN_CHARS:
            self._plain = None
            for earlier in plain:
                self._add(earlier)

    def _add(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        run = self._run
        if run is not None and run.extends(event):
            run.add(event["delta"])
            return
        if (
            kind.endswith(".delta")
            and kind in _TEXT_OF
            and isinstance(event.get("delta"), str)
            and not event.get("logprobs")
            and _RUN_KEYS.issuperset(event)
        ):
            self._run = _Run(event)
            self._records.append(self._run)
            return
        self._run = None
        self._records.append(event)

    def dump(self, response: dict[str, Any]) -> bytes:
        """The log as stored with ``response``, the response these events built. Empty (a replay
        is then rebuilt from the response alone) in the unlikely case that the deltas do not add
        up to the response's texts."""
        if self._plain is not None:
            return orjson.dumps(self._plain)
        records: list[dict[str, Any]] = []
        offsets: dict[tuple[Any, ...], int] = {}  # where the next delta of each text starts
        for record in self._records:
            if isinstance(record, _Run):
                first = record.first
                found = _in_response(response, first)
                key = _text_key(first)
                start = offsets.get(key, 0)
                end = start + record.chars
                if (
                    found is None
                    or not isinstance(found[1], str)
                    or zlib.crc32(found[1][start:end].encode()) != record.crc
                ):
                    return b""
                offsets[key] = end
                lengths = base64.b64encode(record.lengths).decode()
                records.append({**first, "delta": "", LOG_DELTAS: lengths})
                continue
            _advance(offsets, record)
            found = _in_response(response, record)
            if found is not None and _same(record.get(found[0]), found[1]):
                records.append({**record, found[0]: None, LOG_FROM: found[0]})
            else:
                records.append(record)
        return orjson.dumps(records)


def _same(a: Any, b: Any) -> bool:
    return a is b or a == b


def _text_key(event: dict[str, Any]) -> tuple[Any, ...]:
    """Which text a delta adds to."""
    return (
        event["type"],
        event.get("output_index"),
        event.get("content_index"),
        event.get("summary_index"),
    )


def _advance(offsets: dict[tuple[Any, ...], int], event: dict[str, Any]) -> None:
    """Counts the text of a delta stored whole (with logprobs, say) among its text's deltas."""
    delta = event.get("delta")
    if isinstance(delta, str) and event["type"].endswith(".delta") and event["type"] in _TEXT_OF:
        key = _text_key(event)
        offsets[key] = offsets.get(key, 0) + len(delta)


def expand_log(events: list[dict[str, Any]], response: dict[str, Any]) -> list[dict[str, Any]]:
    """The events a stored log (see LOG_DELTAS) stands for, with ``response`` stored with it."""
    out: list[dict[str, Any]] = []
    offsets: dict[tuple[Any, ...], int] = {}
    for record in events:
        if LOG_DELTAS in record:
            found = _in_response(response, record)
            text = found[1] if found is not None and isinstance(found[1], str) else ""
            key = _text_key(record)
            at = offsets.get(key, 0)
            base = {k: v for k, v in record.items() if k != LOG_DELTAS}
            seq = int(record["sequence_number"])
            for n in _lengths(record[LOG_DELTAS]):
                out.append({**base, "sequence_number": seq, "delta": text[at : at + n]})
                at += n
                seq += 1
            offsets[key] = at
        elif LOG_FROM in record:
            member = record[LOG_FROM]
            found = _in_response(response, record)
            value = found[1] if found is not None else None
            out.append(
                {k: (value if k == member else v) for k, v in record.items() if k != LOG_FROM}
            )
            _advance(offsets, out[-1])
        else:
            out.append(record)
            _advance(offsets, record)
    return out


def stored_stream(
    response: dict[str, Any], events: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """The events a stored response is streamed with: the ones stored with it, or
    :func:`replay_events`. Either way the stream opens with ``response.created``; a log that
    holds only its end (a background response cancelled before it ran) is told from
    ``response.created`` on, and a cancelled response ends with ``response.cancelled``."""
    if events:
        events = expand_log(events, response)
    if not events or events[0].get("type") != "response.created":
        events = replay_events(response)
    if response.get("status") == "cancelled" and events[-1]["type"] != "response.cancelled":
        events = [
            *events,
            {"type": "response.cancelled", "sequence_number": len(events), "response": response},
        ]
    return events


def replay_events(response: dict[str, Any]) -> list[dict[str, Any]]:
    """The whole event sequence of a stored response, from ``response.created`` at sequence 0.

    A queued or in-progress response gets no terminal event (it has none yet); a cancelled one
    gets none either, since the Responses API has no event for it.
    """
    events = _Events()
    status = response.get("status")
    snapshot = {
        **response,
        "status": "queued" if status == "queued" else "in_progress",
        "completed_at": None,
        "error": None,
        "incomplete_details": None,
        "output": [],
        "usage": None,
    }
    out = [
        events.make("response.created", response=snapshot),
        events.make("response.in_progress", response={**snapshot, "status": "in_progress"}),
    ]
    if status == "queued":
        return out[:1]
    failed = status == "failed"
    for index, item in enumerate(response.get("output") or []):
        # In a failed response an incomplete item is one the failure left open.
        closed = not (failed and item.get("status") in ("incomplete", "in_progress"))
        out += _replay_item(events, index, item, closed=closed)
    if status == "completed":
        out.append(events.make("response.completed", response=response))
    elif status == "incomplete":
        out.append(events.make("response.incomplete", response=response))
    elif failed:
        error = response.get("error") or {}
        out.append(
            events.make(
                "error",
                code=error.get("code"),
                message=error.get("message", ""),
                param=error.get("param"),
            )
        )
        out.append(events.make("response.failed", response=response))
    return out


def _replay_item(
    events: _Events, index: int, item: dict[str, Any], *, closed: bool
) -> list[dict[str, Any]]:
    kind = item.get("type")
    item_id = item.get("id", "")
    common = {"item_id": item_id, "output_index": index}
    opened = {**item}
    if "status" in item:
        opened["status"] = "in_progress"
    out: list[dict[str, Any]] = []
    if kind == "message":
        opened["content"] = []
        out.append(events.make("response.output_item.added", output_index=index, item=opened))
        parts = item.get("content") or []
        for j, part in enumerate(parts):
            out += _replay_part(events, common, j, part, closed=closed or j < len(parts) - 1)
    elif kind == "reasoning":
        opened["summary"] = []
        if "content" in item:
            opened["content"] = []
        out.append(events.make("response.output_item.added", output_index=index, item=opened))
        for j, summary in enumerate(item.get("summary") or []):
            text = summary.get("text", "")
            out.append(
                events.make(
                    "response.reasoning_summary_part.added",
                    **common,
                    summary_index=j,
                    part={"type": "summary_text", "text": ""},
                )
            )
            if text:
                out.append(
                    events.make(
                        "response.reasoning_summary_text.delta",
                        **common,
                        summary_index=j,
                        delta=text,
                    )
                )
            out.append(
                events.make(
                    "response.reasoning_summary_text.done", **common, summary_index=j, text=text
                )
            )
            out.append(
                events.make(
                    "response.reasoning_summary_part.done",
                    **common,
                    summary_index=j,
                    part={"type": "summary_text", "text": text},
                )
            )
        parts = item.get("content") or []
        for j, part in enumerate(parts):
            out += _replay_part(events, common, j, part, closed=closed or j < len(parts) - 1)
    elif kind == "function_call":
        opened["arguments"] = ""
        out.append(events.make("response.output_item.added", output_index=index, item=opened))
        arguments = item.get("arguments", "")
        if arguments:
            out.append(
                events.make("response.function_call_arguments.delta", **common, delta=arguments)
            )
        if closed:
            out.append(
                events.make(
                    "response.function_call_arguments.done",
                    **common,
                    name=item.get("name", ""),
                    arguments=arguments,
                )
            )
    elif kind == "compaction":
        # As the live stream sent it: the summary is sealed once it is made.
        opened["encrypted_content"] = ""
        out.append(events.make("response.output_item.added", output_index=index, item=opened))
        out.append(events.make("response.compaction.compacting", **common))
    else:
        out.append(events.make("response.output_item.added", output_index=index, item=opened))
    if closed:
        out.append(events.make("response.output_item.done", output_index=index, item=item))
    return out


def _replay_part(
    events: _Events,
    common: dict[str, Any],
    content_index: int,
    part: dict[str, Any],
    *,
    closed: bool,
) -> list[dict[str, Any]]:
    kind = part.get("type")
    where = {**common, "content_index": content_index}
    out: list[dict[str, Any]] = []
    if kind == "output_text":
        text = part.get("text", "")
        logprobs = part.get("logprobs") or []
        out.append(events.make("response.content_part.added", **where, part=output_text("")))
        if text:
            out.append(
                events.make("response.output_text.delta", **where, delta=text, logprobs=logprobs)
            )
        if closed:
            out.append(
                events.make("response.output_text.done", **where, text=text, logprobs=logprobs)
            )
    elif kind == "refusal":
        text = part.get("refusal", "")
        out.append(
            events.make(
                "response.content_part.added", **where, part={"type": "refusal", "refusal": ""}
            )
        )
        if text:
            out.append(events.make("response.refusal.delta", **where, delta=text))
        if closed:
            out.append(events.make("response.refusal.done", **where, refusal=text))
    else:
        text = part.get("text", "")
        out.append(
            events.make(
                "response.content_part.added", **where, part={"type": str(kind), "text": ""}
            )
        )
        if text:
            out.append(events.make("response.reasoning_text.delta", **where, delta=text))
        if closed:
            out.append(events.make("response.reasoning_text.done", **where, text=text))
    if closed:
        out.append(events.make("response.content_part.done", **where, part=part))
    return out
