"""One turn of POST /v1/responses: load the history, prepare stateful tools, call the hub, store.

Three bodies are kept apart:

- the caller's body (``TurnRequest.body``), never mutated;
- the upstream body (:meth:`Turn.upstream`): the current request's instructions, the replayed
  history, the items a bootstrap service injected, then the caller's input;
- the stored turn (:func:`store`): the caller's own input items, the output items and the response
  object; never replayed history, never injected items.

Order of the steps, and what each failure leaves behind:

1. validation (the route) -- nothing called yet;
2. history, in one state call -- the hub is not called when it fails (503);
3. bootstrap, once, only when stateful tools are declared -- the hub is not called on failure;
4. the hub -- nothing is stored when it fails (502/504);
5. store -- the client is answered 200 (or sees ``response.completed``) only after this succeeded.

Steps 4 and 5 with streaming are router_svc.streaming's; how a turn is told apart from a retry,
router_svc.idempotency's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import grpc
import orjson

from gateway import gctune, grpcerrors
from router_svc import (
    bootstrap,
    compaction,
    errors,
    hub,
    idempotency,
    include,
    running,
    state_records,
    tool_loop,
    validate,
    vocabulary,
)
from router_svc import events as events_mod
from router_svc.dialects import Dialect, StreamTranslator
from router_svc.event_log import EventLog
from router_svc.history_cache import Chain, HistoryCache
from router_svc.http import shown_id, valid_id
from router_svc.ids import new_id
from router_svc.response import error_object, response_object
from router_svc.services import Services
from router_svc.shapes import Item, ResponseObject
from router_svc.validate import TurnRequest

log = logging.getLogger(__name__)

HISTORY_TRUNCATED_HEADER = "x-respgw-history-truncated"
# The declared tools a chat model is not offered and nothing here runs (web search, and
# code_interpreter and shell without an execution service), comma-separated: the answer came
# without them. (What the tool loop leaves out when it runs is not named here.)
TOOLS_NOT_RUN_HEADER = "x-respgw-tools-not-run"


@dataclass
class Turn:
    """A validated request with everything the hub call needs."""

    req: TurnRequest
    tenant: str
    response_id: str
    created_at: int
    history: list[Item]
    prepared: bootstrap.Prepared
    conversation_version: int | None
    idempotency_key: str
    omitted_history_items: int = 0
    # How the turn is told apart from a retry (Identity.kind): "", "explicit", "first", "retry".
    key_kind: str = ""
    # The remembered chain the history came from (instead of a GetHistory call), if any.
    parent_chain: Chain | None = None
    # The id of the first response of the turn's chain (its own id for a first turn), and the
    # prompt_cache_key the hub request gets when the client sent none (see session_key; empty
    # when --hub-prompt-cache-key is off).
    chain_root: str = ""
    session_key: str = ""
    # The history's items as stored (JSON), when read with GetHistory: the history cache keeps
    # JSON, which the garbage collector never has to walk.
    history_json: tuple[bytes, ...] = ()
    # The response object last stored for this turn and its JSON as stored, so that the answer
    # is not encoded twice.
    stored_response: ResponseObject | None = None
    stored_json: bytes = b""
    # What the model is sent instead of history + injected + input when sealed items are in it
    # (router_svc.compaction: opened compaction summaries and reasoning), and the compaction
    # item of a turn that compacted its history (context_management); None otherwise.
    model_input: list[Item] | None = None
    compacted: Item | None = None
    # A streamed turn's running form, stored beside the stream (router_svc.running); None when
    # it is not (not streamed, not stored, or --store-running-streams off).
    running_put: running.Running | None = None
    # The declared tool types the model is not offered and nothing runs (TOOLS_NOT_RUN_HEADER).
    tools_not_run: tuple[str, ...] = ()

    def json_of(self, response: ResponseObject) -> bytes:
        """``response`` as the client is shown it, as JSON: the stored bytes when it is the
        response just stored and ``include`` hides nothing of it."""
        shown = include.response(response, self.req.include)
        if shown is self.stored_response:
            return self.stored_json
        return orjson.dumps(shown)

    @property
    def tool_resources(self) -> dict[str, str]:
        return {kind: p.resource_id for kind, p in self.prepared.tools.items() if p.resource_id}

    def model_items(self) -> list[Item]:
        """The items the model is sent, oldest first."""
        if self.model_input is not None:
            return self.model_input
        return [*self.history, *self.prepared.injected_items, *self.req.input_items]

    def upstream(self, dialect: Dialect, *, stream: bool) -> tuple[str, dict[str, Any]]:
        """The hub path and the body sent upstream."""
        req, history, injected = self.req, self.history, self.prepared.injected_items
        if self.model_input is not None:
            req, history, injected = replace(req, input_items=self.model_input), [], []
        body = dialect.request(req, history, injected, stream=stream)
        if self.session_key:
            body.setdefault("prompt_cache_key", self.session_key)
        return dialect.path, body

    def headers(self) -> dict[str, str]:
        if not (self.omitted_history_items or self.tools_not_run):
            return {}
        out: dict[str, str] = {}
        if self.omitted_history_items:
            out[HISTORY_TRUNCATED_HEADER] = str(self.omitted_history_items)
        if self.tools_not_run:
            out[TOOLS_NOT_RUN_HEADER] = ", ".join(self.tools_not_run)
        return out


async def begin(
    svc: Services,
    req: TurnRequest,
    *,
    tenant: str,
    idempotency_key: str = "",
    headers: Mapping[str, str] | None = None,
    ident: idempotency.Identity | None = None,
    response_id: str = "",
    prepare_tools: bool = True,
) -> Turn:
    """Steps 2 and 3: the history, then the bootstrap.

    ``ident`` says how the turn is told from a retry (an ``idempotency_key`` alone is an
    explicit one); ``response_id`` keeps the id of an earlier attempt of this turn;
    ``prepare_tools=False`` calls no bootstrap service (a turn only counted, never run)."""
    if ident is None:
        ident = idempotency.identify(tenant, b"", req.body, idempotency_key, None, store=req.store)
    # Ids no stored object can have are not found, without asking the state service.
    if req.previous_response_id and not valid_id(req.previous_response_id):
        raise errors.previous_response_not_found(shown_id(req.previous_response_id))
    if req.conversation_id and not valid_id(req.conversation_id):
        raise errors.conversation_not_found(shown_id(req.conversation_id), param="conversation")
    if req.store and not svc.state.connected() and not await svc.state.ready():
        # A turn that cannot be stored must not call the hub (the channel is down: one health
        # check decides, only then).
        raise errors.StateUnavailable(
            "The state service is unavailable: nothing was stored and the model was not "
            "called; please try again.",
            headers={"x-should-retry": "true"},
        )
    history: list[Item] = []
    version: int | None = None
    omitted = 0
    history_json: tuple[bytes, ...] = ()
    parent_chain = None
    chain_root = ""
    cache = svc.history_cache
    if req.previous_response_id and req.store and cache is not None and svc.state.connected():
        # Verified when the turn is stored (require_intact_chain): see history_cache.
        parent_chain = cache.get(tenant, req.previous_response_id)
    if parent_chain is not None:
        chain_root = parent_chain.root
        history = [orjson.loads(raw) for raw in parent_chain.items]
        assert cache is not None
        if cache.max_items and len(history) > cache.max_items:
            omitted = len(history) - cache.max_items
            history = history[omitted:]
    elif req.previous_response_id or req.conversation_id:
        if req.previous_response_id:
            prev = req.previous_response_id
            reply = await svc.state.get_history(
                state_records.get_history(tenant, response_id=prev),
                param="previous_response_id",
                # The anchor is the client's previous_response_id, so a missing response is the
                # 400 naming that field, not the 404 of GET /v1/responses/{id} (its reason).
                not_found=lambda err: errors.previous_response_not_found(prev),
            )
        else:
            assert req.conversation_id
            reply = await svc.state.get_history(
                state_records.get_history(tenant, conversation_id=req.conversation_id),
                param="conversation",
            )
        history_json = tuple(i.json for i in reply.items)
        history = [orjson.loads(raw) for raw in history_json]
        if req.conversation_id:
            version = reply.conversation_version
        elif reply.response_ids:
            chain_root = reply.response_ids[0]
        if reply.truncated:
            omitted = reply.omitted_item_count
    references = bool(req.references)
    if references:
        req = await resolve_references(svc, tenant, req, history)
    if (history or references) and not omitted:
        # A call output must answer a call of the input or of the history (OpenAI's 400); a
        # cut history cannot say, so it is not checked then.
        validate.check_tool_outputs(req.input_items, history)
    if omitted:
        if req.body.get("truncation", "disabled") != "auto":
            raise errors.InvalidRequest(
                f"The stored history is longer than this gateway replays ({omitted} older "
                "items would be left out). Send truncation: 'auto' to accept that.",
                param="truncation",
                code="context_length_exceeded",
            )
        log.warning("history truncated", extra={"omitted_items": omitted})

    response_id = response_id or ident.response_id or new_id("resp")
    chain_root = chain_root or req.previous_response_id or response_id
    session = session_key(tenant, req, chain_root)
    hub.session_var.set(session)
    session_in_body = session if svc.settings.hub_prompt_cache_key else ""
    prepared = bootstrap.Prepared.EMPTY
    declared = bootstrap.stateful_tools(req.tools)
    if declared and prepare_tools:
        prepared = await svc.bootstrapper.prepare(
            request_id=response_id,
            tenant=tenant,
            tools=declared,
            response_id=response_id,
            conversation_id=req.conversation_id or "",
            previous_response_id=req.previous_response_id or "",
            headers=_selected_headers(svc, headers or {}),
            metadata=req.metadata,
        )
    turn = Turn(
        req=req,
        tenant=tenant,
        response_id=response_id,
        created_at=int(time.time()),
        history=history,
        prepared=prepared,
        conversation_version=version,
        idempotency_key=ident.idempotency_key,
        key_kind=ident.kind,
        omitted_history_items=omitted,
        parent_chain=parent_chain,
        history_json=history_json,
        chain_root=chain_root,
        session_key=session_in_body,
    )
    if req.tools and svc.dialect.tool_loop:
        # A hub whose tools the gateway offers (Chat Completions); a Responses hub gets them all.
        turn.tools_not_run = tools_not_run(req.tools, executor=svc.executor is not None)
    if compaction.has_sealed(req.input_items, history):
        await compaction.open_turn(svc, turn)
    return turn


def tools_not_run(tools: list[dict[str, Any]], *, executor: bool) -> tuple[str, ...]:
    """The declared tool types a Chat Completions model is never offered, in order: the web
    searches, and code_interpreter and a hosted shell when no execution service runs them (with
    one, the tool loop decides per turn; a local shell is always offered, its calls returned to
    the client). The dialect counts them in respgw_router_tools_not_run_total."""
    kinds: list[str] = []
    for tool in tools:
        kind = str(tool.get("type"))
        if kind not in vocabulary.CHAT_NOT_RUN_TOOLS or kind in kinds:
            continue
        if (executor and kind in bootstrap.STATEFUL_TOOL_TYPES) or bootstrap.is_local_shell(tool):
            continue
        kinds.append(kind)
    return tuple(kinds)


async def resolve_references(
    svc: Services, tenant: str, req: TurnRequest, history: list[Item]
) -> TurnRequest:
    """The request with each item reference of its input replaced, in place, by the item it
    names, as stored: from the turn's history when the item is there (its newest copy), else
    from the tenant's stored response and conversation items, in one GetItems call for all of
    them. An id the tenant has no item for is a 400 naming the reference (``input[2]``).

    The resolved items are stored as the turn's input like any input item, except in a
    conversation: an item already in the conversation (its history, or earlier in this input)
    is sent to the model but not stored again, since a conversation holds an id once."""
    wanted = {str(req.input_items[i]["id"]) for i in req.references}
    known: dict[str, Item] = {}
    for item in history:
        item_id = item.get("id")
        if item_id in wanted:
            known[item_id] = item  # a later copy wins, as GetItems picks the newest
    missing = [i for i in wanted if i not in known]
    if missing:
        fetched = await svc.state.get_items_by_id(tenant, sorted(missing))
        known.update((item_id, orjson.loads(data)) for item_id, data in fetched.items())
    items = list(req.input_items)
    for position in req.references:
        item_id = str(items[position]["id"])
        found = known.get(item_id)
        if found is None:
            raise errors.item_not_found(shown_id(item_id), f"input[{position}]")
        # A copy: the history's items are sent to the hub too, and the turn's are stored.
        items[position] = orjson.loads(orjson.dumps(found))
    unstored: tuple[int, ...] = ()
    if req.conversation_id:
        seen = {item.get("id") for item in history}
        kept: list[int] = []
        for position, item in enumerate(items):
            if position in req.references and item.get("id") in seen:
                kept.append(position)
            seen.add(item.get("id"))
        unstored = tuple(kept)
    return dataclasses.replace(req, input_items=items, references=(), unstored=unstored)


def session_key(tenant: str, req: TurnRequest, chain_root: str) -> str:
    """The hub session key of a turn: the same for every turn of a conversation or of a
    previous_response_id chain, so that a prefix-cache-aware router in front of the model servers
    (vLLM's router, llm-d, an Envoy hash on the header) keeps them on the replica that holds their
    prefix. The client's own prompt_cache_key wins; otherwise a digest of the tenant and the
    conversation id or the chain's first response id (ids are not shown to the hub)."""
    given = req.body.get("prompt_cache_key")
    if isinstance(given, str) and given:
        return given
    anchor = req.conversation_id or chain_root
    digest = hashlib.blake2b(f"{tenant}\x00{anchor}".encode(), digest_size=16).hexdigest()
    return f"rg-{digest}"


def _selected_headers(svc: Services, headers: Mapping[str, str]) -> dict[str, str]:
    wanted = [h.strip().lower() for h in svc.settings.bootstrap_headers.split(",") if h.strip()]
    return {name: headers[name] for name in wanted if name != "authorization" and name in headers}


async def store(
    svc: Services,
    turn: Turn,
    response: ResponseObject,
    events: EventLog | None = None,
    *,
    in_progress: bool = False,
    keep_output: bool = True,
) -> ResponseObject:
    """Step 5: stores the turn (when ``store`` is true) and returns the response to answer.
    Without ``keep_output`` the response's output is shown (GET) but not stored as the turn's
    output items, so that no later turn builds on it.

    On a replay (the turn's key was used by a turn stored meanwhile) the first response is
    returned instead; with an Idempotency-Key, a first response with another body is a 400. A
    failure after which the turn may be stored tells the client not to retry (x-should-retry:
    false) unless a retry would find it (any key).
    """
    if not turn.req.store:
        return response
    output = response.get("output", []) if keep_output else []
    log = events.dump(response) if events is not None else b""
    # The JSON of a long streamed answer's response is made in pieces as they are sent (its
    # response was answered already): never whole (see events.json_slices).
    sliced = (
        _sliced_json(response)
        if events is not None and events.long and svc.state.put_turn_chunked_served
        else None
    )
    if sliced is not None and not state_records.large_turn(b"", log, sliced[0]):
        sliced = None
    response_json = orjson.dumps(response) if sliced is None else b""
    large = sliced is not None or state_records.large_turn(response_json, log)
    # A large turn goes in pieces (PutTurnChunked) to a state service that serves it, so that
    # neither side holds it as one message; else encoded here, as one PutTurn.
    chunked = large and svc.state.put_turn_chunked_served
    # The state service takes the items of a large turn from the response JSON when it can
    # (every one that serves PutTurnChunked does): the answer then goes once (and is encoded here
    # only for the history cache).
    derived = large and keep_output and (chunked or svc.state.response_json_with_output_items)
    output_json = [] if derived and svc.history_cache is None else [orjson.dumps(i) for i in output]
    request, stored = state_records.put_turn_request(
        turn.tenant,
        response_id=turn.response_id,
        previous_response_id=turn.req.previous_response_id or "",
        conversation_id=turn.req.conversation_id or "",
        input_items=turn.req.stored_inputs(),
        idempotency_key=turn.idempotency_key,
        in_progress=in_progress,
        output=output,
        output_json=output_json,
        response_json=response_json if sliced is None else sliced,
        events_json=log,
        encoded=large,
        chunked=chunked,
        combined=derived,
        require_intact_chain=turn.parent_chain is not None,
        omit_stored_content=True,
        # A background turn ran on the history of its start, whatever was appended since:
        # nobody is there to retry it, and the caller asked for exactly that.
        expected_conversation_version=None if turn.req.background else turn.conversation_version,
    )
    if large:
        # Not held while the state service answers unless needed after: the items for the
        # history cache, the JSON for the answer of a turn not streamed.
        if svc.history_cache is None:
            output_json = []
        if events is not None:
            response_json = b""
    del log
    param = "previous_response_id" if turn.req.previous_response_id else None
    try:
        if callable(request):
            reply = (await svc.state.put_turn_chunked(request, param=param)).put_turn
        else:
            reply = await svc.state.put_turn(request, param=param)
    except errors.Conflict as exc:
        if exc.code == "conflict" and turn.idempotency_key:
            # A concurrent request with the same key (and response id) stored its turn first.
            winner = await idempotency.find_idempotent(svc, turn.tenant, turn.idempotency_key)
            if winner is not None:
                return winner
        raise
    except errors.ApiError as exc:
        if chunked and _unimplemented(exc):
            # A state service that predates PutTurnChunked (one replica of a fleet being
            # upgraded) stored nothing: sent again as one PutTurn.
            svc.state.put_turn_chunked_served = False
            return await store(
                svc, turn, response, events, in_progress=in_progress, keep_output=keep_output
            )
        if derived and _refused_combined(exc):
            # A state service that predates response_json_with_output_items (one replica of a
            # fleet being upgraded) refused the turn, storing nothing: sent again with its items.
            svc.state.response_json_with_output_items = False
            return await store(
                svc, turn, response, events, in_progress=in_progress, keep_output=keep_output
            )
        exc.retry_header(retry_is_safe=bool(turn.idempotency_key))
        raise
    svc.state.response_json_with_output_items = reply.response_json_with_output_items
    if large:
        gctune.give_back()  # what the encoded request and gRPC's copy of it took
    if reply.replayed and reply.response.id != turn.response_id:
        first = state_records.response_of(reply.response)
        if turn.key_kind == "explicit" and first.get("id") != idempotency.keyed_response_id(
            turn.tenant, turn.idempotency_key
        ):
            raise idempotency.idempotency_key_reused()
        if turn.key_kind == "retry" and running.unfinished_stream(first):
            # The first attempt of this SDK call is streaming (stored as running): it answers
            # this retry once it ended, unless it failed; then this retry is stored on its own.
            first = await running.when_done(svc, turn.tenant, first)
            if first.get("status") not in ("in_progress", "failed"):
                return first
            turn.idempotency_key, turn.key_kind = "", ""
            return await store(
                svc, turn, response, events, in_progress=in_progress, keep_output=keep_output
            )
        if turn.key_kind == "first" and reply.response.id != idempotency.retry_id(
            turn.idempotency_key
        ):
            # An identical request stored earlier in the window, not a retry of this one (which
            # would have the retry id): a client asking the same on purpose gets a turn of its
            # own, stored without the key.
            turn.idempotency_key, turn.key_kind = "", ""
            return await store(
                svc, turn, response, events, in_progress=in_progress, keep_output=keep_output
            )
        return first
    if svc.history_cache is not None and not in_progress and not reply.replayed:
        _remember(svc.history_cache, turn, stored, output_json, reply)
    if response_json:
        turn.stored_response, turn.stored_json = response, response_json
    return response


def _remember(
    cache: HistoryCache,
    turn: Turn,
    stored: state_records.StoredResponse,
    output_json: list[bytes],
    reply: state_records.PutTurnReply,
) -> None:
    """Remembers the history ending at the turn just stored, when it is whole and its expiry
    is known (see history_cache)."""
    cache.max_items = reply.history_max_items
    if turn.req.conversation_id or turn.omitted_history_items:
        return
    expire_us = (
        reply.response.expire_time.ToMicroseconds()
        if reply.response.HasField("expire_time")
        else None
    )
    own = (*(i.json for i in stored.input_items), *output_json)
    if turn.parent_chain is None and turn.req.previous_response_id:
        if expire_us is not None:
            return  # when the older turns of the chain expire is not known here
        own = turn.history_json + own
    cache.remember(
        turn.tenant, turn.response_id, turn.parent_chain, own, expire_us, root=turn.chain_root
    )


def _sliced_json(response: ResponseObject) -> state_records.SlicedJson | None:
    """The JSON of ``response`` made in pieces (its size, and what makes them), when it holds a
    long string; None otherwise."""
    pieces = events_mod.json_slices(response)
    if pieces is None:
        return None
    size = sum(map(len, pieces))

    def make() -> Iterator[bytes]:
        again = events_mod.json_slices(response)
        assert again is not None
        return again

    return size, make


def _unimplemented(exc: errors.ApiError) -> bool:
    """Whether ``exc`` is an older state service's UNIMPLEMENTED (an RPC it does not serve)."""
    cause = exc.__cause__
    return isinstance(cause, grpc.aio.AioRpcError) and cause.code() == grpc.StatusCode.UNIMPLEMENTED


def _refused_combined(exc: errors.ApiError) -> bool:
    """Whether ``exc`` is an older state service's refusal of response_json_with_output_items
    (it requires response_json)."""
    cause = exc.__cause__
    if isinstance(cause, grpc.aio.AioRpcError):
        info = grpcerrors.error_info(cause)
        return (
            info.code == grpc.StatusCode.INVALID_ARGUMENT
            and info.metadata.get("field") == "response.response_json"
        )
    return False


async def complete(svc: Services, turn: Turn) -> ResponseObject:
    """Steps 4 and 5 without streaming."""
    return await store(svc, turn, await answer(svc, turn))


async def answer(svc: Services, turn: Turn) -> ResponseObject:
    """Step 4 without streaming: the hub's answer as a Response object."""
    if compaction.compact_threshold(turn.req) is not None:
        return await _compacting_answer(svc, turn)
    return await _answer(svc, turn)


async def _compacting_answer(svc: Services, turn: Turn) -> ResponseObject:
    """A turn with context_management: its history compacted first when it is too long (the
    compaction item leads the output)."""
    lead = None if tool_loop.runs_tools(svc, turn) else await compaction.answer_lead(svc, turn)
    response = await _answer(svc, turn)
    if lead is not None:
        response["output"].insert(0, lead)
    return response


async def _answer(svc: Services, turn: Turn) -> ResponseObject:
    if tool_loop.runs_tools(svc, turn):
        return await tool_loop.answer(svc, turn)  # code_interpreter and shell run in a tool loop
    path, body = turn.upstream(svc.dialect, stream=False)
    upstream = await svc.hub.post(path, body)
    try:
        return _translated(svc, turn, upstream)
    except (TypeError, KeyError, AttributeError, IndexError, ValueError) as exc:
        # JSON of the wrong shape from the hub (a field of the wrong type) is the hub's fault.
        log.warning("hub answer could not be translated", extra={"detail": repr(exc)[:300]})
        raise errors.UpstreamError(
            "The model server's answer has fields of the wrong type.",
            code="upstream_malformed_response",
        ) from exc


def _translated(svc: Services, turn: Turn, upstream: Any) -> ResponseObject:
    response = svc.dialect.result(
        turn.req,
        upstream,
        response_id=turn.response_id,
        created_at=turn.created_at,
        tool_resources=turn.tool_resources,
    )
    if turn.req.include and compaction.mints_reasoning(svc, turn.req):
        compaction.mint_reasoning(svc, turn.tenant, response)
    return response


def snapshot(turn: Turn, status: str, **fields: Any) -> ResponseObject:
    """The Response object of a turn with no output yet (queued, in progress, failed, cancelled)."""
    return response_object(
        turn.req,
        response_id=turn.response_id,
        created_at=turn.created_at,
        status=status,
        output=[],
        tool_resources=turn.tool_resources,
        **fields,
    )


def stream_translator(svc: Services, turn: Turn) -> StreamTranslator | tool_loop.StreamLoop:
    """The translator of a streamed turn's hub stream into events (router_svc.streaming, and a
    background turn's): the tool loop when code_interpreter or shell runs, else the dialect's."""
    if tool_loop.runs_tools(svc, turn):
        return tool_loop.StreamLoop(svc, turn)  # code_interpreter and shell run in a tool loop
    return svc.dialect.translator(
        turn.req,
        response_id=turn.response_id,
        created_at=turn.created_at,
        tool_resources=turn.tool_resources,
        seal_reasoning=_reasoning_sealer(svc, turn) if turn.req.include else None,
    )


def _reasoning_sealer(svc: Services, turn: Turn) -> Callable[[str], str] | None:
    """Reasoning items get the gateway's encrypted_content when they are done (if asked for)."""
    if compaction.mints_reasoning(svc, turn.req):
        tenant = turn.tenant
        return lambda text: compaction.seal_reasoning(svc, tenant, text)
    return None


# The error message of a turn the router's shutdown stopped.
SHUT_DOWN_MESSAGE = "The gateway was stopped before this response finished; send it again."


def shut_down_snapshot(turn: Turn) -> ResponseObject:
    """A turn the router's shutdown stopped, as a failed response (stored, never in progress)."""
    return snapshot(turn, "failed", error=error_object("server_error", SHUT_DOWN_MESSAGE))
