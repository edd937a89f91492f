"""The streamed tool loop: one event sequence over several hub calls and the tool calls run.

:class:`StreamLoop` stands in for a stream translator (:mod:`router_svc.events`) when a streamed
turn's ``code_interpreter`` or ``shell`` calls run here (:mod:`router_svc.tool_loop`): each round's
chat stream is translated, renumbered into the turn's one sequence, the stateful calls shown as
their tools' items with their SDK events (the code streamed as the model writes it, a shell
call's output as the command prints it) and run as soon as they are complete; a local shell's
calls are shown the same way up to their ``response.output_item.done`` and returned to the
client, which ends the loop after their round.
"""

from __future__ import annotations

import asyncio
import copy
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Unpack

from router_svc import execution, include
from router_svc.dialects import chat
from router_svc.ids import new_id
from router_svc.response import error_object, response_object
from router_svc.shapes import EventFields, Item, ResponseObject, StreamEvent
from router_svc.tool_calls import Loop, Turn, not_run
from router_svc.tool_items import (
    CODE_INTERPRETER,
    Offer,
    ci_item,
    parse_python,
    parse_shell,
    shell_call_item,
    shell_entries,
    shell_output_item,
    shell_text,
)

if TYPE_CHECKING:
    from router_svc.services import Services

OUTPUTS_INCLUDE = include.OUTPUTS


class _JsonString:
    """Decodes, piece by piece, one string field of a JSON object that arrives in pieces (the
    code of a python call streamed by the hub), so that the code can be streamed too."""

    _ESCAPES = {
        '"': '"',
        "\\": "\\",
        "/": "/",
        "b": "\b",
        "f": "\f",
        "n": "\n",
        "r": "\r",
        "t": "\t",
    }

    def __init__(self, key: str) -> None:
        self._start = re.compile(r'"' + re.escape(key) + r'"\s*:\s*"')
        self._buffer = ""
        self._at: int | None = None
        self._done = False

    def feed(self, piece: str) -> str:
        self._buffer += piece
        if self._done:
            return ""
        if self._at is None:
            found = self._start.search(self._buffer)
            if found is None:
                return ""
            self._at = found.end()
        out: list[str] = []
        buffer, i = self._buffer, self._at
        while i < len(buffer):
            char = buffer[i]
            if char == '"':
                self._done = True
                break
            if char != "\\":
                out.append(char)
                i += 1
                continue
            if i + 1 >= len(buffer):
                break
            escape = buffer[i + 1]
            if escape != "u":
                out.append(self._ESCAPES.get(escape, escape))
                i += 2
                continue
            if i + 6 > len(buffer):
                break
            code = int(buffer[i + 2 : i + 6], 16) if _hex(buffer[i + 2 : i + 6]) else 0xFFFD
            if 0xD800 <= code < 0xDC00:
                if i + 12 > len(buffer):
                    break
                low = buffer[i + 8 : i + 12] if buffer[i + 6 : i + 8] == "\\u" else ""
                if low and _hex(low):
                    code = 0x10000 + ((code - 0xD800) << 10) + (int(low, 16) - 0xDC00)
                    i += 6
            out.append(chr(code) if code < 0xD800 or code > 0xDFFF else "\ufffd")
            i += 6
        self._at = i
        return "".join(out)


def _hex(text: str) -> bool:
    return len(text) == 4 and all(c in "0123456789abcdefABCDEF" for c in text)


@dataclass
class _StreamCall:
    """A stateful call being streamed: the hub's function call and the item shown for it."""

    offer: Offer
    index: int  # its output_index in the response
    item: Item
    call_id: str
    code: _JsonString = field(default_factory=lambda: _JsonString("code"))
    action: dict[str, Any] = field(default_factory=dict)
    problem: str = ""
    text: str | None = None  # the tool's answer, once run


@dataclass
class _Round:
    """One hub call of a streamed turn."""

    translator: chat.ChatStreamTranslator
    number: int
    index: dict[int, int] = field(default_factory=dict)  # hub output_index -> ours
    calls: dict[int, _StreamCall] = field(default_factory=dict)  # by hub output_index
    cited: dict[tuple[int, int], list[dict[str, Any]]] = field(default_factory=dict)
    terminal: StreamEvent | None = None
    caller_calls: bool = False


class StreamLoop(Loop):
    """A streamed turn whose stateful tools run here, as one event sequence over several hub
    calls. It stands in for the stream translator in turn's pump: :meth:`rounds` replaces the
    hub's chunks (each a batch of finished events, which :meth:`feed` passes on), and
    :meth:`start`, :meth:`finish`, :meth:`fail` and :attr:`response` work as the translator's."""

    def __init__(self, svc: Services, turn: Turn) -> None:
        super().__init__(svc, turn)
        self._sequence = 0
        self._started = False
        self._final: ResponseObject | None = None
        self._open: set[int] = set()

    def _event(self, kind: str, **fields: Unpack[EventFields]) -> StreamEvent:
        event: StreamEvent = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    def _shown(self, response: ResponseObject) -> ResponseObject:
        """The response as the client is shown it (the stored one keeps the outputs)."""
        return include.response(response, self.req.include)

    # -- the translator's interface

    def start(self) -> list[StreamEvent]:
        if self._started:
            return []
        self._started = True
        # Its own (empty) output list: the events are kept, and stored, after the output grew.
        snapshot = response_object(
            self.req,
            response_id=self.turn.response_id,
            created_at=self.turn.created_at,
            status="in_progress",
            output=[],
            tool_resources=self.turn.tool_resources,
        )
        return [
            self._event("response.created", response=snapshot),
            self._event("response.in_progress", response=copy.copy(snapshot)),
        ]

    def feed(self, chunk: dict[str, Any]) -> list[StreamEvent]:
        events: list[StreamEvent] = chunk["events"]
        return events

    def finish(self) -> list[StreamEvent]:
        return []  # the terminal event came with the last round

    def response_now(self) -> ResponseObject:
        return self.as_response("in_progress")

    @property
    def response(self) -> ResponseObject:
        """The Response object as it stands; final once the terminal event went out."""
        return self._final if self._final is not None else self.response_now()

    def fail(self, code: str, message: str) -> list[StreamEvent]:
        if self._final is not None:
            return []
        events = self.start()
        for index in self._open:
            self.output[index]["status"] = "incomplete"
        self._open.clear()
        self._final = self.as_response("failed", error=error_object(code, message))
        events.append(self._event("error", code=code, message=message, param=None))
        events.append(self._event("response.failed", response=self._shown(self._final)))
        return events

    # -- the rounds

    async def rounds(self) -> AsyncIterator[dict[str, Any]]:
        """The event batches of the whole turn, ending with its terminal event."""
        await self.prepare(stream=True)
        for round_no in range(self.settings.max_rounds):
            translator = chat.ChatStreamTranslator(
                self.req,
                response_id=self.turn.response_id,
                created_at=self.turn.created_at,
                tool_resources=self.turn.tool_resources,
            )
            translator.start()  # ours went out already
            rnd = _Round(translator, round_no)
            chunks = self.svc.hub.stream("/chat/completions", self.body(round_no))
            try:
                async for chunk in chunks:
                    async for batch in self._rewrite(rnd, translator.feed(chunk)):
                        yield {"events": batch}
                async for batch in self._rewrite(rnd, translator.finish()):
                    yield {"events": batch}
            finally:
                aclose = getattr(chunks, "aclose", None)
                if aclose is not None:
                    await aclose()
            self.add_usage(translator.response.get("usage"))
            terminal = rnd.terminal or {"type": "response.completed", "response": {}}
            ran = [c for c in rnd.calls.values() if c.text is not None]
            last = round_no + 1 >= self.settings.max_rounds
            if terminal["type"] != "response.completed" or not ran or rnd.caller_calls or last:
                details = (terminal.get("response") or {}).get("incomplete_details")
                status = "completed" if terminal["type"] == "response.completed" else "incomplete"
                self._final = self.as_response(status, incomplete_details=details)
                shown = self._shown(self._final)
                yield {"events": [self._event(terminal["type"], response=shown)]}
                return
            self.messages = [*self.messages, *self._next_messages(rnd)]

    def _next_messages(self, rnd: _Round) -> list[dict[str, Any]]:
        output = rnd.translator.response["output"]
        text = "".join(
            part.get("text", "")
            for item in output
            if item.get("type") == "message"
            for part in item.get("content") or []
            if part.get("type") == "output_text"
        )
        calls = [
            {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item.get("arguments") or ""},
            }
            for item in output
            if item.get("type") == "function_call"
        ]
        assistant: dict[str, Any] = {"role": "assistant", "content": text or None}
        if calls:
            assistant["tool_calls"] = calls
        answers = [
            {"role": "tool", "tool_call_id": c.call_id, "content": c.text or "(not run)"}
            for c in rnd.calls.values()
        ]
        return [assistant, *answers]

    async def _rewrite(
        self, rnd: _Round, events: list[StreamEvent]
    ) -> AsyncIterator[list[StreamEvent]]:
        """Our events for a batch of the round translator's: renumbered, re-indexed, the
        stateful calls shown as their tools' items and run as soon as they are complete."""
        out: list[StreamEvent] = []
        for event in events:
            kind = event["type"]
            if kind in ("response.created", "response.in_progress", "response.queued"):
                continue
            if kind in ("response.completed", "response.incomplete"):
                rnd.terminal = event
                continue
            fields = {k: v for k, v in event.items() if k not in ("type", "sequence_number")}
            hub_index = event.get("output_index")
            if kind == "response.output_item.added" and isinstance(hub_index, int):
                out += self._added(rnd, hub_index, event["item"])
                continue
            call = rnd.calls.get(hub_index) if isinstance(hub_index, int) else None
            if call is not None:
                if kind == "response.output_item.done":
                    if out:
                        yield out
                        out = []
                    async for batch in self._run_streamed(
                        rnd, call, complete=event["item"].get("status") == "completed"
                    ):
                        yield batch
                else:
                    out += self._call_event(call, kind, event)
                continue
            if isinstance(hub_index, int):
                fields["output_index"] = rnd.index.get(hub_index, hub_index)
            out += self._passed(rnd, kind, fields)
        if out:
            yield out

    def _added(self, rnd: _Round, hub_index: int, item: Item) -> list[StreamEvent]:
        index = len(self.output)
        rnd.index[hub_index] = index
        self._open.add(index)
        offer = (
            self.offers.get(str(item.get("name"))) if item.get("type") == "function_call" else None
        )
        if offer is None:
            if item.get("type") in ("function_call", "custom_tool_call"):
                rnd.caller_calls = True
            # The translator's own item: it keeps filling it in.
            self.output.append(rnd.translator.response["output"][hub_index])
            return [self._event("response.output_item.added", output_index=index, item=item)]
        call_id = str(item.get("call_id") or new_id("call"))
        if offer.kind == CODE_INTERPRETER:
            data = ci_item(offer)
        else:
            data = shell_call_item(offer, call_id, {"commands": []})
        rnd.calls[hub_index] = _StreamCall(offer=offer, index=index, item=data, call_id=call_id)
        self.output.append(data)
        events = [
            self._event("response.output_item.added", output_index=index, item=copy.deepcopy(data))
        ]
        if offer.kind == CODE_INTERPRETER:
            events.append(
                self._event(
                    "response.code_interpreter_call.in_progress",
                    item_id=data["id"],
                    output_index=index,
                )
            )
        return events

    def _call_event(self, call: _StreamCall, kind: str, event: StreamEvent) -> list[StreamEvent]:
        common = {"item_id": call.item["id"], "output_index": call.index}
        if kind == "response.function_call_arguments.delta":
            if call.offer.kind != CODE_INTERPRETER:
                return []
            delta = call.code.feed(str(event.get("delta") or ""))
            if not delta:
                return []
            return [self._event("response.code_interpreter_call_code.delta", **common, delta=delta)]
        if kind != "response.function_call_arguments.done":
            return []
        arguments = str(event.get("arguments") or "")
        if call.offer.kind == CODE_INTERPRETER:
            code, call.problem = parse_python(arguments)
            call.item["code"] = code
            return [self._event("response.code_interpreter_call_code.done", **common, code=code)]
        call.action, call.problem = parse_shell(arguments)
        call.item["action"] = dict(call.action)
        events: list[StreamEvent] = []
        for i, command in enumerate(call.action["commands"]):
            where: dict[str, Any] = {"command_index": i, "output_index": call.index}
            events.append(self._event("response.shell_call_command.added", **where, command=""))
            events.append(self._event("response.shell_call_command.delta", **where, delta=command))
            events.append(self._event("response.shell_call_command.done", **where, command=command))
        return events

    def _passed(self, rnd: _Round, kind: str, fields: dict[str, Any]) -> list[StreamEvent]:
        """An event of an item the loop does not run, with the files it names cited."""
        events: list[StreamEvent] = []
        index = fields.get("output_index")
        if kind == "response.output_text.done" and isinstance(index, int):
            citations = self.citations(str(fields.get("text", "")))
            if citations:
                j = int(fields.get("content_index", 0))
                part = self.output[index]["content"][j]
                start = len(part.get("annotations") or [])
                part["annotations"] = [*(part.get("annotations") or []), *citations]
                rnd.cited[(index, j)] = part["annotations"]
                for n, citation in enumerate(citations):
                    events.append(
                        self._event(
                            "response.output_text.annotation.added",
                            item_id=fields["item_id"],
                            output_index=index,
                            content_index=j,
                            annotation_index=start + n,
                            annotation=citation,
                        )
                    )
        elif kind == "response.content_part.done" and isinstance(index, int):
            cited = rnd.cited.get((index, int(fields.get("content_index", 0))))
            if cited is not None:
                fields["part"] = {**fields["part"], "annotations": copy.deepcopy(cited)}
        elif kind == "response.output_item.done" and isinstance(index, int):
            self._open.discard(index)
            item = fields.get("item") or {}
            for (i, j), cited in rnd.cited.items():
                if i == index and j < len(item.get("content") or []):
                    item["content"][j]["annotations"] = copy.deepcopy(cited)
        events.append(self._event(kind, **fields))
        return events

    async def _run_streamed(
        self, rnd: _Round, call: _StreamCall, *, complete: bool
    ) -> AsyncIterator[list[StreamEvent]]:
        """Runs a complete stateful call and streams what it does, up to its items' ends."""
        item, index = call.item, call.index
        common = {"item_id": item["id"], "output_index": index}
        reason = "" if complete else "cut"
        if not call.offer.local:  # a local shell's calls are the client's, as its functions are
            reason = reason or self.may_run(rnd.number)
        if reason:
            item["status"] = "incomplete"
            self._open.discard(index)
            yield [
                self._event(
                    "response.output_item.done", output_index=index, item=copy.deepcopy(item)
                )
            ]
            return
        if call.offer.kind == CODE_INTERPRETER:
            yield [self._event("response.code_interpreter_call.interpreting", **common)]
            if call.problem:
                result, call.text = not_run(call.problem), call.problem
            else:
                result, call.text = await self.run_python(call.offer, item["code"], call.call_id)
            await self.finish_ci(item, result)
            self._open.discard(index)
            shown = copy.deepcopy(item)
            if OUTPUTS_INCLUDE not in self.req.include:
                shown["outputs"] = None
            yield [
                self._event("response.code_interpreter_call.completed", **common),
                self._event("response.output_item.done", output_index=index, item=shown),
            ]
            return
        item["status"] = "completed"
        self._open.discard(index)
        yield [
            self._event("response.output_item.done", output_index=index, item=copy.deepcopy(item))
        ]
        if call.offer.local and not call.problem:
            rnd.caller_calls = True  # the client runs it and sends its shell_call_output
            return
        output = shell_output_item(call.call_id, call.action)
        out_index = len(self.output)
        self.output.append(output)
        self._open.add(out_index)
        where = {"item_id": output["id"], "output_index": out_index}
        yield [
            self._event(
                "response.output_item.added", output_index=out_index, item=copy.deepcopy(output)
            )
        ]
        if call.problem:
            result = not_run(call.problem)
            entries = [
                {"stdout": "", "stderr": call.problem, "outcome": {"type": "exit", "exit_code": 1}}
            ]
            call.text = call.problem
        else:
            box: list[execution.ExecResult] = []
            async for batch in self._shell_deltas(call, where, box):
                yield batch
            result = box[0]
            entries = shell_entries(call.action, result)
            call.text = shell_text(call.action, entries, result, self.settings.output_chars)
        done = [
            self._event(
                "response.shell_call_output_content.done", **where, command_index=i, output=[entry]
            )
            for i, entry in enumerate(entries)
        ]
        output.update(status="completed", output=entries)
        self._open.discard(out_index)
        yield [
            *done,
            self._event(
                "response.output_item.done", output_index=out_index, item=copy.deepcopy(output)
            ),
        ]

    async def _shell_deltas(
        self, call: _StreamCall, where: dict[str, Any], box: list[execution.ExecResult]
    ) -> AsyncIterator[list[StreamEvent]]:
        """Runs a shell call, streaming its output as it comes; puts the result in ``box``."""
        queue: asyncio.Queue[StreamEvent] = asyncio.Queue()

        async def on_output(index: int, name: str, text: str) -> None:
            queue.put_nowait(
                self._event(
                    "response.shell_call_output_content.delta",
                    **where,
                    command_index=index,
                    delta={name: text},
                )
            )

        task = asyncio.create_task(self.run_shell(call.offer, call.action, call.call_id, on_output))
        try:
            while not task.done() or not queue.empty():
                if queue.empty():
                    getter = asyncio.ensure_future(queue.get())
                    done, _ = await asyncio.wait(
                        {getter, task}, return_when=asyncio.FIRST_COMPLETED
                    )
                    if getter not in done:
                        getter.cancel()
                        continue
                    batch = [getter.result()]
                else:
                    batch = []
                while not queue.empty():
                    batch.append(queue.get_nowait())
                yield batch
            box.append(task.result())
        finally:
            if not task.done():
                task.cancel()
