"""The chat stream: the chunks of a streamed chat completion as Responses streaming events.

:class:`ChatStreamTranslator` (on :class:`router_svc.events.Translator`) turns each chunk into
events as it comes: reasoning text, output text (with logprobs when included) and refusals as
content parts of their items, tool calls (by their chunk index) as the items of their tools,
their arguments as they arrive (a custom tool's input once decoded, when the call closes). The
stream ends completed or incomplete by its finish reason; a stream that ends without one, or
with one that says the hub gave up (``abort``, ``error``), is :func:`router_svc.events.ended_early`.
Text is held as its UTF-8 in one growing buffer, not one string per delta (:class:`_Text`). Compaction items
(:mod:`router_svc.compaction`) are opened and closed on it before the hub is called.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from router_svc import errors, hub_shape
from router_svc.dialects.chat.result import (
    INCOMPLETE_REASONS,
    LOGPROBS_INCLUDE,
    chat_logprobs,
    chat_reasoning,
    usage_from_chat,
)
from router_svc.dialects.chat.tools import ChatToolset, custom_input
from router_svc.events import Translator, ended_early
from router_svc.ids import new_id
from router_svc.inputs import output_text
from router_svc.response import (
    NO_RESOURCES,
    error_object,
    message_item,
    reasoning_item,
    response_object,
)
from router_svc.shapes import Item, ResponseObject, StreamEvent
from router_svc.validate import TurnRequest

# finish_reason values that say the hub stopped without finishing the answer: vLLM and SGLang end an
# aborted request's stream (engine shutdown, preemption, an abort) with "abort", then [DONE].
_ABORTED = frozenset({"abort", "error"})


class _Text:
    """Text that arrives in pieces: the latest pieces as their UTF-8 in one buffer, decoded a
    block at a time onto the text read so far. A str object costs 49 bytes more than its text,
    so a piece per few-byte delta would cost many times the answer; blocks of joined pieces (as
    before) were long-lived allocations made among the hub's transient reads, which they kept
    from being reused. The text is grown in place (CPython resizes a str that nothing else
    holds; glibc grows a large block by remapping it), so that it is never held twice: decoding
    the whole buffer at the end held the answer as UTF-8 and as text at once, the peak of a long
    answer (bench/bench_memory.py: a 2 MB answer in 4-byte deltas from 2.8x to 1.9x of it in the
    router)."""

    __slots__ = ("_text", "_utf8")

    def __init__(self) -> None:
        self._utf8 = bytearray()  # pieces not decoded yet, fewer than _TEXT_BLOCK bytes
        self._text = ""  # what was decoded

    def append(self, piece: str) -> None:
        # surrogatepass: a lone surrogate (JSON allows its escape) is kept as it came. Each
        # piece is encoded whole, so the buffer always ends on a character.
        self._utf8 += piece.encode("utf-8", "surrogatepass")
        if len(self._utf8) >= _TEXT_BLOCK:
            self._decode()

    def value(self) -> str:
        if self._utf8:
            self._decode()
        return self._text

    def _decode(self) -> None:
        block = self._utf8.decode("utf-8", "surrogatepass")
        self._utf8 = bytearray()
        text = self._text
        self._text = ""
        # In place while nothing else holds the text (a value() read mid-stream does: the next
        # block then makes a new one, as the read text must stay as it was).
        text += block
        self._text = text


# The UTF-8 of a text's pieces decoded at once onto it.
_TEXT_BLOCK = 64 * 1024


@dataclass
class _Part:
    """An open content part; its text is kept as it comes and decoded when read."""

    data: dict[str, Any]  # the part inside its item's "content"
    key: str  # "text" or "refusal"
    pieces: _Text = field(default_factory=_Text)

    def render(self) -> None:
        self.data[self.key] = self.pieces.value()


@dataclass
class _Item:
    """An output item being streamed."""

    index: int
    data: Item  # the item inside the response's output
    parts: list[_Part] = field(default_factory=list)
    arguments: _Text = field(default_factory=_Text)
    call: _Call | None = None  # the chat tool call a function_call item streams

    def render(self) -> None:
        for part in self.parts:
            part.render()
        if self.data["type"] == "function_call":
            self.data["arguments"] = self.arguments.value()
        elif self.data["type"] == "custom_tool_call":
            self.data["input"] = custom_input(self.arguments.value())


@dataclass
class _Call:
    """A tool call of the chat stream, by its chunk index; added once its name is known."""

    call_id: str = ""
    name: str = ""
    pending: list[str] = field(default_factory=list)
    item: _Item | None = None
    closed: bool = False


class ChatStreamTranslator(Translator):
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
        self._output: list[Item] = []
        # The names the hub knows the declared tools by (namespace functions, custom tools).
        self._toolset = ChatToolset(req.tools)
        self._open: list[_Item] = []  # the item being streamed (a call joins once named)
        self._calls: dict[int, _Call] = {}
        self._last_call: int | None = None
        self._finish_reason: str | None = None
        self._usage: dict[str, Any] | None = None
        self._logprobs = LOGPROBS_INCLUDE in req.include
        # Seals a reasoning item's text into its encrypted_content when the item is done (set by
        # the turn when the client asked for reasoning.encrypted_content); None: no sealing.
        self.seal_reasoning: Callable[[str], str] | None = None

    # -- the Response object

    def _response(self, status: str, **extra: Any) -> ResponseObject:
        return response_object(
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
    def response(self) -> ResponseObject:
        """The Response object as it stands; final once finish() or fail() ran."""
        if self._final is not None:
            return self._final
        for item in self._open:
            item.render()
        return self._response("in_progress")

    # -- lifecycle

    def feed(self, chunk: dict[str, Any]) -> list[StreamEvent]:
        """The events for one parsed ``chat.completion.chunk``."""
        if self._final is not None:
            return []
        hub_shape.check_chunk(chunk)
        events = self.start()
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._usage = usage_from_chat(usage)
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            reasoning = chat_reasoning(delta)
            if reasoning:
                events += self._part_delta("reasoning", "reasoning_text", reasoning, None)
            content = delta.get("content")
            if isinstance(content, str) and content:
                logprobs = None
                if self._logprobs:
                    logprobs = chat_logprobs((choice.get("logprobs") or {}).get("content"))
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

    def finish(self) -> list[StreamEvent]:
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
            raise ended_early("no finish_reason")
        if self._finish_reason in _ABORTED:
            raise ended_early(f"finish_reason {self._finish_reason!r}")
        events = self.start()
        reason = INCOMPLETE_REASONS.get(self._finish_reason)
        events += self._close_all(last_status="incomplete" if reason else "completed")
        if reason is None:
            self._final = self._response("completed")
            events.append(self._events.make("response.completed", response=self._final))
        else:
            self._final = self._response("incomplete", incomplete_details={"reason": reason})
            events.append(self._events.make("response.incomplete", response=self._final))
        return events

    def fail(self, code: str, message: str) -> list[StreamEvent]:
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
        self._final = self._response("failed", error=error_object(code, message))
        events.append(self._events.make("error", code=code, message=message, param=None))
        events.append(self._events.make("response.failed", response=self._final))
        return events

    # -- compaction (router_svc.compaction), before the hub is called

    def open_compaction(self, item_id: str) -> list[StreamEvent]:
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

    def close_compaction(self, item: Item) -> list[StreamEvent]:
        """The compaction item is made: ``response.output_item.done``."""
        index = next(i for i, data in enumerate(self._output) if data.get("id") == item["id"])
        self._output[index] = item
        return [self._events.make("response.output_item.done", output_index=index, item=dict(item))]

    # -- items

    def _add(self, data: Item) -> tuple[_Item, StreamEvent]:
        item = _Item(index=len(self._output), data=data)
        self._output.append(data)
        self._open.append(item)
        event = self._events.make(
            "response.output_item.added", output_index=item.index, item=copy.deepcopy(data)
        )
        return item, event

    def _close_all(self, *, last_status: str = "completed") -> list[StreamEvent]:
        events: list[StreamEvent] = []
        for call in self._calls.values():
            if call.item is None and not call.closed:
                events += self._add_call(call)
        last = len(self._output) - 1
        for item in list(self._open):
            status = last_status if item.index == last else "completed"
            events += self._close(item, status)
        return events

    def _close(self, item: _Item, status: str) -> list[StreamEvent]:
        self._open.remove(item)
        if item.call is not None:
            item.call.closed = True
        item.render()
        events: list[StreamEvent] = []
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

    def _close_part(self, item: _Item, content_index: int) -> list[StreamEvent]:
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
    ) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        item = self._open[-1] if self._open else None
        if item is None or item.data["type"] != item_type:
            events += self._close_all()
            if item_type == "message":
                data = message_item([], status="in_progress")
            else:
                data = reasoning_item("", status="in_progress")
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

    def _call_delta(self, delta: dict[str, Any]) -> list[StreamEvent]:
        index = delta.get("index")
        if not isinstance(index, int) or isinstance(index, bool):
            index = self._implicit_index(delta.get("id"))
        function = delta.get("function") or {}
        events: list[StreamEvent] = []
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

    def _add_call(self, call: _Call) -> list[StreamEvent]:
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

    def _flush_arguments(self, item: _Item, pending: list[str]) -> list[StreamEvent]:
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


def _seal(data: Item, seal: Callable[[str], str]) -> None:
    data["encrypted_content"] = seal("".join(p.get("text", "") for p in data.get("content") or []))
