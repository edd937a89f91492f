"""Hub dialects: the model-server API the gateway speaks to its hub, one module (or package) each.

The dialect is chosen once at start-up from ``--hub-api`` (:func:`dialect_for`) and held on
``Services.dialect``; the routes ask it what its hub cannot do (:meth:`Dialect.refuse`, once the
request is parsed), and the turn asks it, never the setting, how to build the hub request
(:meth:`Dialect.request` for :attr:`Dialect.path`), how to read the whole answer
(:meth:`Dialect.result`) and how to translate the hub's stream (:meth:`Dialect.translator`).
Every dialect answers with the one Response object (:mod:`router_svc.response`) and the one event
plumbing (:mod:`router_svc.events`).

- ``chat`` (:mod:`router_svc.dialects.chat`, a package of its request, messages, tools, result
  and stream): a Chat Completions hub (vLLM, SGLang, llama.cpp, Ollama, ...). The gateway does
  what the hub cannot: it runs the stateful tool loop, seals reasoning for stateless clients,
  and compacts long histories itself.
- ``responses`` (:mod:`router_svc.dialects.responses`): a hub that speaks the Responses API
  itself, used statelessly; it compacts and mints its reasoning by itself.

Adding a dialect is one new module (or package) here with a class that has these members, and
one line in :data:`DIALECTS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from router_svc.dialects.chat import ChatDialect
from router_svc.dialects.responses import ResponsesDialect
from router_svc.shapes import Item, ResponseObject, StreamEvent
from router_svc.validate import TurnRequest


class StreamTranslator(Protocol):
    """Turns the events (or chunks) of one hub stream into Responses streaming events."""

    @property
    def response(self) -> ResponseObject:
        """The Response object as it stands; final once finish() or fail() ran."""
        ...

    def start(self) -> list[StreamEvent]:
        """``response.created`` and ``response.in_progress`` (once)."""
        ...

    def feed(self, chunk: dict[str, Any]) -> list[StreamEvent]:
        """The events for one parsed chunk or event of the hub's stream."""
        ...

    def finish(self) -> list[StreamEvent]:
        """The hub's stream ended: the terminal event, or :class:`errors.UpstreamError` (code
        :data:`events.STREAM_INCOMPLETE`) when the hub had not finished."""
        ...

    def fail(self, code: str, message: str) -> list[StreamEvent]:
        """``error`` and ``response.failed``."""
        ...


class Dialect(Protocol):
    """What a turn needs from the API its hub speaks."""

    # The value of --hub-api that chooses it.
    name: str
    # The hub path (under --hub-url) a turn posts to, whole or streamed.
    path: str
    # The gateway runs the stateful tools (code_interpreter, shell) in a tool loop of hub calls
    # on this hub (router_svc.tool_loop); otherwise the hub runs or refuses them.
    tool_loop: bool
    # The gateway seals reasoning text into encrypted_content for stateless clients and opens it
    # when it comes back (router_svc.compaction); otherwise the hub mints its own.
    seals_reasoning: bool
    # The hub compacts by itself (context_management, POST /responses/compact) and its own
    # compaction items go back to it as they are; otherwise the gateway summarizes.
    own_compaction: bool

    def refuse(self, req: TurnRequest) -> None:
        """Refuses (:class:`errors.InvalidRequest`) a well-formed request this hub cannot serve;
        called where the turn is parsed, before any history is loaded or the bootstrap service
        called."""
        ...

    def request(
        self,
        req: TurnRequest,
        history: list[Item],
        injected: list[Item],
        *,
        stream: bool,
    ) -> dict[str, Any]:
        """The body posted to :attr:`path`: the history, then the injected items and the input."""
        ...

    def result(
        self,
        req: TurnRequest,
        answer: Any,
        *,
        response_id: str,
        created_at: int,
        tool_resources: Mapping[str, str],
    ) -> ResponseObject:
        """The hub's whole answer as the Response object; :class:`errors.UpstreamError` when it
        is not one of the dialect's answers."""
        ...

    def translator(
        self,
        req: TurnRequest,
        *,
        response_id: str,
        created_at: int,
        tool_resources: Mapping[str, str],
        seal_reasoning: Callable[[str], str] | None = None,
    ) -> StreamTranslator:
        """The translator of one streamed answer; ``seal_reasoning`` seals a reasoning item's
        text when the item is done (a dialect that :attr:`seals_reasoning` only)."""
        ...

    def summary_request(
        self, model: str, items: list[Item], instructions: str | None, prompt: str
    ) -> dict[str, Any]:
        """The body posted to :attr:`path` asking the model to summarize ``items`` (compaction)."""
        ...

    def summary(self, answer: Any) -> tuple[object, dict[str, Any] | None]:
        """The summary text in the answer to :meth:`summary_request` (not checked), and the
        usage in Responses terms."""
        ...


# --hub-api -> its dialect.
DIALECTS: Mapping[str, Callable[[], Dialect]] = {
    "chat": ChatDialect,
    "responses": ResponsesDialect,
}


def dialect_for(hub_api: str) -> Dialect:
    """The dialect ``--hub-api`` names; ValueError, naming the choices, for any other."""
    make = DIALECTS.get(hub_api)
    if make is None:
        raise ValueError(f"--hub-api must be {' or '.join(DIALECTS)}, got {hub_api!r}")
    return make()
