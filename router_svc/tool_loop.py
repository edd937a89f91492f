"""The tool loop: code_interpreter and shell, run by the gateway for a Chat Completions hub.

A chat model cannot run OpenAI's hosted tools, so when a turn declares ``code_interpreter`` or
``shell``, the bootstrap service prepared a session for it and the execution service runs that
kind of call (:mod:`router_svc.execution`), the model is offered each as a function tool (their
items and how a chat model knew them: :mod:`router_svc.tool_items`). When the model calls one,
the router runs the call in the session, sends the output back as the tool's answer and calls the
model again, until it answers without such a call, calls one of the caller's own tools (those are
returned to the caller, as always), or a limit is reached: the request's ``max_tool_calls`` (a
call beyond it is not run) or ``--tool-max-rounds`` hub calls (the last one is made without the
tools, so the model answers).

Streamed, the calls have the events of the current SDK
(``response.code_interpreter_call.in_progress``, ``..._code.delta``, ``..._code.done``,
``.interpreting``, ``.completed``; ``response.shell_call_command.added/delta/done``,
``response.shell_call_output_content.delta/done``). Files a call wrote are cited in the answer's
text with ``container_file_citation`` annotations where the text names them.

A sandbox failure (a timeout, a limit, an expired session) is the call's output, never the
turn's failure: the model reads it and answers. A hub failure fails the turn as usual.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import dataclasses
import logging
import re
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from router_svc import errors, execution, include
from router_svc.dialects import chat
from router_svc.ids import new_id
from router_svc.response import error_object, response_object
from router_svc.tool_items import (
    CODE_INTERPRETER,
    STATEFUL,
    Names,
    Offer,
    ci_item,
    parse_python,
    parse_shell,
    python_logs,
    python_text,
    replayable,
    shell_call_item,
    shell_entries,
    shell_output_item,
    shell_text,
)

if TYPE_CHECKING:
    from router_svc.services import Services
    from router_svc.turn import Turn

log = logging.getLogger(__name__)

OUTPUTS_INCLUDE = include.OUTPUTS
# Images a call wrote are shown in ``outputs`` as data URLs up to this size.
IMAGE_BYTES = 1024 * 1024
# The item types of stateful tool calls a history may hold.
_TOOL_ITEMS = frozenset({"code_interpreter_call", "shell_call", "shell_call_output"})


@dataclass(frozen=True)
class LoopSettings:
    max_rounds: int
    output_chars: int


def loop_settings(svc: Services) -> LoopSettings:
    """The loop's settings (``--tool-max-rounds``, ``--tool-output-chars``)."""
    return LoopSettings(
        max_rounds=max(1, svc.settings.tool_max_rounds),
        output_chars=max(1000, svc.settings.tool_output_chars),
    )


def executor_of(svc: Services) -> execution.GrpcExecutor | None:
    """The router's execution client, if it has one."""
    return svc.executor


def runs_tools(svc: Services, turn: Turn) -> bool:
    """True when this module answers the turn: a chat hub, and either a prepared stateful tool
    the execution service may run, or stateful tool items in the history to replay."""
    if not svc.dialect.tool_loop:
        return False
    if executor_of(svc) is not None and any(
        kind in STATEFUL and prepared.resource_id for kind, prepared in turn.prepared.tools.items()
    ):
        return True
    return _has_tool_items(turn.history) or _has_tool_items(turn.req.input_items)


def _has_tool_items(items: Iterable[Mapping[str, Any]]) -> bool:
    return any(item.get("type") in _TOOL_ITEMS for item in items)


def _not_run(reason: str) -> execution.ExecResult:
    return execution.ExecResult(error=reason)


MAX_CALLS_REACHED = "Not run: this response reached its max_tool_calls."
ROUNDS_REACHED = "Not run: the tool loop reached its limit of rounds."


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


# --- the loop ------------------------------------------------------------------------------


async def first_request(svc: Services, turn: Turn) -> dict[str, Any]:
    """The chat request of the loop's first round, as :func:`answer` would send it (what
    POST /v1/responses/input_tokens counts)."""
    loop = _Loop(svc, turn)
    await loop.prepare(stream=False)
    return loop.body(0)


class _Loop:
    """What both paths share: the offered tools, the chat request, the output, the limits."""

    def __init__(self, svc: Services, turn: Turn) -> None:
        self.svc = svc
        self.turn = turn
        self.req = turn.req
        self.settings = loop_settings(svc)
        self.executor = executor_of(svc)
        self.names = Names.avoiding(turn.req.tools)
        self.offers: dict[str, Offer] = {}
        self.output: list[dict[str, Any]] = []
        self.usage: dict[str, Any] | None = None
        self.calls = 0
        limit = turn.req.body.get("max_tool_calls")
        self.max_calls: int | None = limit if isinstance(limit, int) else None
        # Files written during this turn, with their container, in the order they were written.
        self.files: dict[str, tuple[str, execution.FileInfo]] = {}
        self.messages: list[dict[str, Any]] = []
        self._base: dict[str, Any] = {}
        self._caller_tools: list[dict[str, Any]] = []
        self._caller_choice: Any = None

    async def prepare(self, *, stream: bool) -> None:
        caps = await self.executor.capabilities() if self.executor is not None else None
        for kind, prepared in self.turn.prepared.tools.items():
            if kind not in STATEFUL or not prepared.resource_id or caps is None:
                continue
            if not (caps.runs_python if kind == CODE_INTERPRETER else caps.runs_commands):
                continue
            name = self.names.python if kind == CODE_INTERPRETER else self.names.shell
            self.offers[name] = Offer(kind, name, prepared.resource_id, prepared.state)
        offered = {o.kind for o in self.offers.values()}
        limit = self.settings.output_chars
        history = self.turn.history
        given = self.req.input_items
        injected = self.turn.prepared.injected_items
        if self.turn.model_input is not None:
            # Sealed items opened (router_svc.compaction): history and injected items included.
            history, given, injected = [], self.turn.model_input, []
        # The tools nobody runs stay in the request, so translate reports them as not run.
        req = dataclasses.replace(
            self.req,
            tools=[t for t in self.req.tools if t.get("type") not in offered],
            input_items=replayable(given, self.names, limit),
        )
        body = chat.chat_request(
            req,
            replayable(history, self.names, limit),
            injected,
            stream=stream,
        )
        self.messages = body.pop("messages")
        self._caller_tools = body.pop("tools", [])
        self._caller_choice = body.pop("tool_choice", None)
        body.pop("parallel_tool_calls", None)
        self._base = body

    def offering(self, round_no: int) -> bool:
        """Whether this round may offer (and run) the stateful tools."""
        if round_no >= self.settings.max_rounds - 1:
            return False
        return self.max_calls is None or self.calls < self.max_calls

    def body(self, round_no: int) -> dict[str, Any]:
        """The chat request of one round."""
        mine = (
            [o for o in self.offers.values() if self._allowed(o)] if self.offering(round_no) else []
        )
        tools = [*self._caller_tools, *(o.chat_tool() for o in mine)]
        out = {**self._base, "messages": self.messages}
        if not tools:
            return out
        out["tools"] = tools
        choice = self._choice(round_no, mine)
        if choice is not None:
            out["tool_choice"] = choice
        parallel = self.req.body.get("parallel_tool_calls")
        if parallel is not None:
            out["parallel_tool_calls"] = parallel
        return out

    def _allowed(self, offer: Offer) -> bool:
        choice = self.req.body.get("tool_choice")
        if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
            return any(
                isinstance(t, dict) and t.get("type") == offer.kind
                for t in choice.get("tools") or []
            )
        return True

    def _choice(self, round_no: int, mine: list[Offer]) -> Any:
        raw = self.req.body.get("tool_choice")
        if isinstance(raw, str):
            # "required" asks for a call: once it was made, the model may answer.
            return "auto" if raw == "required" and round_no > 0 else raw
        if isinstance(raw, dict):
            kind = raw.get("type")
            if kind in STATEFUL:
                forced = [o for o in mine if o.kind == kind]
                if forced and round_no == 0:
                    return {"type": "function", "function": {"name": forced[0].chat_name}}
                return "auto"
            if kind == "allowed_tools":
                mode = raw.get("mode", "auto")
                return "auto" if mode == "required" and round_no > 0 else mode
        return self._caller_choice

    def may_run(self, round_no: int) -> str:
        """Why a call of this round is not run; empty when it may run."""
        if self.max_calls is not None and self.calls >= self.max_calls:
            return MAX_CALLS_REACHED
        if not self.offering(round_no):
            return ROUNDS_REACHED
        return ""

    def add_usage(self, usage: Mapping[str, Any] | None) -> None:
        if not usage:
            return
        if self.usage is None:
            self.usage = copy.deepcopy(dict(usage))
            return
        for key in ("input_tokens", "output_tokens", "total_tokens"):
            self.usage[key] = int(self.usage.get(key) or 0) + int(usage.get(key) or 0)
        for details, key in (
            ("input_tokens_details", "cached_tokens"),
            ("output_tokens_details", "reasoning_tokens"),
        ):
            mine = self.usage.setdefault(details, {})
            mine[key] = int(mine.get(key) or 0) + int((usage.get(details) or {}).get(key) or 0)

    def remember_files(self, offer: Offer, result: execution.ExecResult) -> None:
        for f in result.files:
            self.files.pop(f.file_id, None)
            self.files[f.file_id] = (offer.session_id, f)

    def citations(self, text: str) -> list[dict[str, Any]]:
        """container_file_citation annotations for the files of this turn that ``text`` names."""
        found: list[dict[str, Any]] = []
        for container_id, f in self.files.values():
            start = text.find(f.path)
            end = start + len(f.path)
            if start < 0:
                start = text.find(f.filename)
                end = start + len(f.filename)
            if start < 0:
                continue
            found.append(
                {
                    "type": "container_file_citation",
                    "container_id": container_id,
                    "end_index": end,
                    "file_id": f.file_id,
                    "filename": f.filename,
                    "start_index": start,
                }
            )
        found.sort(key=lambda a: (a["start_index"], a["file_id"]))
        return found

    def cite(self, item: dict[str, Any]) -> None:
        """Adds citations to a finished message item's text parts."""
        if item.get("type") != "message" or not self.files:
            return
        for part in item.get("content") or []:
            if part.get("type") == "output_text":
                part["annotations"] = [
                    *(part.get("annotations") or []),
                    *self.citations(part["text"]),
                ]

    async def run_python(
        self, offer: Offer, code: str, call_id: str
    ) -> tuple[execution.ExecResult, str]:
        assert self.executor is not None
        self.calls += 1
        result = await self.executor.execute(
            tenant=self.turn.tenant,
            session_id=offer.session_id,
            prepared_state=offer.state,
            code=code,
            call_id=call_id,
        )
        self.remember_files(offer, result)
        return result, python_text(result, self.settings.output_chars)

    async def finish_ci(self, item: dict[str, Any], result: execution.ExecResult) -> None:
        """Fills a code_interpreter_call item from its result, outputs included whatever the
        request's ``include`` (they are stored, and replayed to later turns; a client is shown
        them only when it asks: :mod:`router_svc.include`)."""
        failed = result.error or any(c.outcome != "exited" for c in result.commands)
        item["status"] = "failed" if failed else "completed"
        outputs: list[dict[str, Any]] = []
        logs = python_logs(result)
        if logs:
            outputs.append({"type": "logs", "logs": logs})
        outputs += await self._images(item["container_id"], result)
        item["outputs"] = outputs

    async def _images(self, session_id: str, result: execution.ExecResult) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.executor is None:
            return out
        for f in result.files:
            if not f.media_type.startswith("image/") or f.size_bytes > IMAGE_BYTES:
                continue
            data = await self.executor.read_file(
                self.turn.tenant, session_id, f.file_id, IMAGE_BYTES
            )
            if data:
                url = f"data:{f.media_type};base64,{base64.b64encode(data).decode()}"
                out.append({"type": "image", "url": url})
        return out

    async def run_shell(
        self,
        offer: Offer,
        action: Mapping[str, Any],
        call_id: str,
        on_output: execution.OnOutput | None = None,
    ) -> execution.ExecResult:
        assert self.executor is not None
        self.calls += 1
        timeout_ms = action.get("timeout_ms")
        result = await self.executor.execute(
            tenant=self.turn.tenant,
            session_id=offer.session_id,
            prepared_state=offer.state,
            commands=list(action.get("commands") or []),
            timeout_s=timeout_ms / 1000 if isinstance(timeout_ms, int) else None,
            call_id=call_id,
            on_output=on_output,
        )
        self.remember_files(offer, result)
        return result

    def _response(self, status: str, **fields: Any) -> dict[str, Any]:
        return response_object(
            self.req,
            response_id=self.turn.response_id,
            created_at=self.turn.created_at,
            status=status,
            output=self.output,
            usage=self.usage,
            tool_resources=self.turn.tool_resources,
            **fields,
        )


# --- without streaming -------------------------------------------------------------------------


async def answer(svc: Services, turn: Turn) -> dict[str, Any]:
    """The turn's Response object, after as many rounds as the model needs (not stored here)."""
    loop = _Loop(svc, turn)
    await loop.prepare(stream=False)
    status, details = "completed", None
    for round_no in range(loop.settings.max_rounds):
        completion = await svc.hub.post("/chat/completions", loop.body(round_no))
        try:
            answered = chat.from_chat_completion(
                turn.req, completion, response_id=turn.response_id, created_at=turn.created_at
            )
        except (TypeError, KeyError, AttributeError, IndexError, ValueError) as exc:
            # JSON of the wrong shape from the hub (a field of the wrong type) is the hub's fault.
            raise errors.UpstreamError(
                "The model server's answer has fields of the wrong type.",
                code="upstream_malformed_response",
            ) from exc
        loop.add_usage(answered.get("usage"))
        status, details = answered["status"], answered.get("incomplete_details")
        tool_messages: list[dict[str, Any]] = []
        ran = False
        caller_calls = False
        for item in answered["output"]:
            offer = (
                loop.offers.get(str(item.get("name")))
                if item.get("type") == "function_call"
                else None
            )
            if offer is None:
                caller_calls = caller_calls or item.get("type") in (
                    "function_call",
                    "custom_tool_call",
                )
                loop.cite(item)
                loop.output.append(item)
                continue
            text = await _run_whole(loop, offer, item, round_no, complete=status == "completed")
            ran = ran or text is not None
            tool_messages.append(
                {"role": "tool", "tool_call_id": item["call_id"], "content": text or "(not run)"}
            )
        if (
            status != "completed"
            or not ran
            or caller_calls
            or round_no + 1 >= loop.settings.max_rounds
        ):
            break
        loop.messages = [*loop.messages, _assistant(completion), *tool_messages]
    return loop._response(status, incomplete_details=details)


async def _run_whole(
    loop: _Loop, offer: Offer, call: dict[str, Any], round_no: int, *, complete: bool
) -> str | None:
    """Runs one stateful call of a whole (not streamed) answer and adds its items to the output;
    returns the tool's answer for the model, or None when the call was not run."""
    arguments = str(call.get("arguments") or "")
    call_id = str(call.get("call_id") or new_id("call"))
    reason = "" if complete else "cut"
    reason = reason or loop.may_run(round_no)
    if offer.kind == CODE_INTERPRETER:
        code, problem = parse_python(arguments)
        item = ci_item(offer, code=code)
        loop.output.append(item)
        if reason:
            item["status"] = "incomplete"
            return None
        if problem:
            result = _not_run(problem)
            text = problem
        else:
            result, text = await loop.run_python(offer, code, call_id)
        await loop.finish_ci(item, result)
        return text
    action, problem = parse_shell(arguments)
    shell_call = shell_call_item(offer, call_id, action)
    loop.output.append(shell_call)
    if reason:
        shell_call["status"] = "incomplete"
        return None
    shell_call["status"] = "completed"
    result = _not_run(problem) if problem else await loop.run_shell(offer, action, call_id)
    entries = shell_entries(action, result)
    if problem:
        entries = [{"stdout": "", "stderr": problem, "outcome": {"type": "exit", "exit_code": 1}}]
    output = shell_output_item(call_id, action)
    output.update(status="completed", output=entries)
    loop.output.append(output)
    return (
        shell_text(action, entries, result, loop.settings.output_chars) if not problem else problem
    )


def _assistant(completion: Mapping[str, Any]) -> dict[str, Any]:
    """The hub's answer as the assistant message of the next round's request."""
    message = (completion.get("choices") or [{}])[0].get("message") or {}
    content = message.get("content")
    out: dict[str, Any] = {
        "role": "assistant",
        "content": content if isinstance(content, str) else None,
    }
    calls = [
        {
            "id": c.get("id"),
            "type": "function",
            "function": {
                "name": (c.get("function") or {}).get("name"),
                "arguments": (c.get("function") or {}).get("arguments") or "",
            },
        }
        for c in message.get("tool_calls") or []
        if isinstance(c, dict)
    ]
    if calls:
        out["tool_calls"] = calls
    return out


# --- streaming ---------------------------------------------------------------------------------


@dataclass
class _StreamCall:
    """A stateful call being streamed: the hub's function call and the item shown for it."""

    offer: Offer
    index: int  # its output_index in the response
    item: dict[str, Any]
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
    terminal: dict[str, Any] | None = None
    caller_calls: bool = False


class StreamLoop(_Loop):
    """A streamed turn whose stateful tools run here, as one event sequence over several hub
    calls. It stands in for the stream translator in turn's pump: :meth:`rounds` replaces the
    hub's chunks (each a batch of finished events, which :meth:`feed` passes on), and
    :meth:`start`, :meth:`finish`, :meth:`fail` and :attr:`response` work as the translator's."""

    def __init__(self, svc: Services, turn: Turn) -> None:
        super().__init__(svc, turn)
        self._sequence = 0
        self._started = False
        self._final: dict[str, Any] | None = None
        self._open: set[int] = set()

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    def _shown(self, response: dict[str, Any]) -> dict[str, Any]:
        """The response as the client is shown it (the stored one keeps the outputs)."""
        return include.response(response, self.req.include)

    # -- the translator's interface

    def start(self) -> list[dict[str, Any]]:
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

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = chunk["events"]
        return events

    def finish(self) -> list[dict[str, Any]]:
        return []  # the terminal event came with the last round

    def response_now(self) -> dict[str, Any]:
        return self._response("in_progress")

    @property
    def response(self) -> dict[str, Any]:
        """The Response object as it stands; final once the terminal event went out."""
        return self._final if self._final is not None else self.response_now()

    def fail(self, code: str, message: str) -> list[dict[str, Any]]:
        if self._final is not None:
            return []
        events = self.start()
        for index in self._open:
            self.output[index]["status"] = "incomplete"
        self._open.clear()
        self._final = self._response("failed", error=error_object(code, message))
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
                self._final = self._response(status, incomplete_details=details)
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
        self, rnd: _Round, events: list[dict[str, Any]]
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Our events for a batch of the round translator's: renumbered, re-indexed, the
        stateful calls shown as their tools' items and run as soon as they are complete."""
        out: list[dict[str, Any]] = []
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

    def _added(self, rnd: _Round, hub_index: int, item: dict[str, Any]) -> list[dict[str, Any]]:
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

    def _call_event(
        self, call: _StreamCall, kind: str, event: dict[str, Any]
    ) -> list[dict[str, Any]]:
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
        events: list[dict[str, Any]] = []
        for i, command in enumerate(call.action["commands"]):
            where = {"command_index": i, "output_index": call.index}
            events.append(self._event("response.shell_call_command.added", **where, command=""))
            events.append(self._event("response.shell_call_command.delta", **where, delta=command))
            events.append(self._event("response.shell_call_command.done", **where, command=command))
        return events

    def _passed(self, rnd: _Round, kind: str, fields: dict[str, Any]) -> list[dict[str, Any]]:
        """An event of an item the loop does not run, with the files it names cited."""
        events: list[dict[str, Any]] = []
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
                            item_id=fields.get("item_id"),
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
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Runs a complete stateful call and streams what it does, up to its items' ends."""
        item, index = call.item, call.index
        common = {"item_id": item["id"], "output_index": index}
        reason = "" if complete else "cut"
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
                result, call.text = _not_run(call.problem), call.problem
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
        output = shell_output_item(call.call_id, call.action)
        out_index = len(self.output)
        self.output.append(output)
        self._open.add(out_index)
        where = {"item_id": output["id"], "output_index": out_index}
        yield [self._event("response.output_item.added", **where, item=copy.deepcopy(output))]
        if call.problem:
            result = _not_run(call.problem)
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
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Runs a shell call, streaming its output as it comes; puts the result in ``box``."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

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
