"""The state a tool loop carries across its rounds, and running one tool call.

A :class:`Loop` is one turn's tool loop (:mod:`router_svc.tool_loop`) as both its paths share it:
the stateful tools offered to the model (as function tools), the chat request of each round (the
caller's tools and ``tool_choice`` kept, the offered tools left out of the last round and past
``max_tool_calls``; a local shell offered in every round, as the caller's tools are), the usage
summed over the rounds, and one ``code_interpreter`` or hosted ``shell`` call run in the
execution service's session, with the files it wrote cited in the answer's text.
What is not run is said in the call's output (:func:`not_run`), never a failure of the turn.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from router_svc import bootstrap, execution
from router_svc.dialects import chat
from router_svc.response import response_object
from router_svc.shapes import Item, ResponseObject
from router_svc.tool_items import (
    CODE_INTERPRETER,
    STATEFUL,
    Names,
    Offer,
    python_logs,
    python_text,
    replayable,
)

if TYPE_CHECKING:
    from router_svc.bootstrap import Prepared
    from router_svc.services import Services
    from router_svc.validate import TurnRequest

# Images a call wrote are shown in ``outputs`` as data URLs up to this size.
IMAGE_BYTES = 1024 * 1024


class Turn(Protocol):
    """What the tool loop reads of a turn (a :class:`router_svc.turn.Turn`): named here so that
    the loop needs not import turn.py, which imports it."""

    req: TurnRequest
    tenant: str
    response_id: str
    created_at: int
    history: list[Item]
    prepared: Prepared
    # Sealed items opened (router_svc.compaction), sent instead of history + injected + input.
    model_input: list[Item] | None

    @property
    def tool_resources(self) -> dict[str, str]: ...


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


def not_run(reason: str) -> execution.ExecResult:
    return execution.ExecResult(error=reason)


MAX_CALLS_REACHED = "Not run: this response reached its max_tool_calls."
ROUNDS_REACHED = "Not run: the tool loop reached its limit of rounds."


class Loop:
    """What both paths share: the offered tools, the chat request, the output, the limits."""

    def __init__(self, svc: Services, turn: Turn) -> None:
        self.svc = svc
        self.turn = turn
        self.req = turn.req
        self.settings = loop_settings(svc)
        self.executor = executor_of(svc)
        self.names = Names.avoiding(turn.req.tools)
        self.offers: dict[str, Offer] = {}
        self.output: list[Item] = []
        self.usage: dict[str, Any] | None = None
        self.calls = 0
        limit = turn.req.body.get("max_tool_calls")
        self.max_calls: int | None = limit if isinstance(limit, int) else None
        # Files written during this turn, with their container, in the order they were written.
        self.files: dict[str, tuple[str, execution.FileInfo]] = {}
        # Local shell calls returned to the client: the loop stops after their round.
        self.returned = 0
        self.messages: list[dict[str, Any]] = []
        self._base: dict[str, Any] = {}
        self._caller_tools: list[dict[str, Any]] = []
        self._caller_choice: Any = None

    async def prepare(self, *, stream: bool) -> None:
        hosted = [
            (kind, prepared)
            for kind, prepared in self.turn.prepared.tools.items()
            if kind in STATEFUL and prepared.resource_id
        ]
        # A turn whose only stateful tool is a local shell asks the execution service nothing.
        caps = await self.executor.capabilities() if self.executor and hosted else None
        for kind, prepared in hosted:
            if caps is None:
                continue
            if not (caps.runs_python if kind == CODE_INTERPRETER else caps.runs_commands):
                continue
            name = self.names.python if kind == CODE_INTERPRETER else self.names.shell
            self.offers[name] = Offer(kind, name, prepared.resource_id, prepared.state)
        for tool in self.req.tools:
            if bootstrap.is_local_shell(tool):
                self.offers[self.names.shell] = Offer.local_shell(self.names.shell, tool)
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
        # The shell calls of the history that the new input answers (a local shell's outputs).
        answered = [str(i.get("call_id")) for i in given if i.get("type") == "shell_call_output"]
        body = chat.chat_request(
            req,
            replayable(history, self.names, limit, answered),
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
        """The chat request of one round: a local shell is offered in every round, as the
        caller's own tools are (its calls end the loop)."""
        offering = self.offering(round_no)
        mine = [o for o in self.offers.values() if self._allowed(o) and (o.local or offering)]
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

    def cite(self, item: Item) -> None:
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

    async def finish_ci(self, item: Item, result: execution.ExecResult) -> None:
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

    def as_response(self, status: str, **fields: Any) -> ResponseObject:
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
