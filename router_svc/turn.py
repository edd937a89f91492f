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
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import orjson

from gateway import grpcerrors
from router_svc import (
    bootstrap,
    compaction,
    errors,
    hub,
    include,
    running,
    state_records,
    validate,
)
from router_svc import tool_loop as tools  # named as before while turn.py is being split
from router_svc.dialects import Dialect, StreamTranslator
from router_svc.event_log import EventLog
from router_svc.events import SSE_DONE, sse_encode, sse_pieces
from router_svc.history_cache import Chain, HistoryCache
from router_svc.http import shown_id, valid_id
from router_svc.ids import new_id
from router_svc.replay import replay_events
from router_svc.response import error_object, response_object
from router_svc.services import Services
from router_svc.validate import TurnRequest

log = logging.getLogger(__name__)
# Back-off jitter from a generator of our own: the global one is the application's (and tests
# seed it).
_jitter = random.Random()

HISTORY_TRUNCATED_HEADER = "x-respgw-history-truncated"


@dataclass
class Turn:
    """A validated request with everything the hub call needs."""

    req: TurnRequest
    tenant: str
    response_id: str
    created_at: int
    history: list[dict[str, Any]]
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
    stored_response: dict[str, Any] | None = None
    stored_json: bytes = b""
    # What the model is sent instead of history + injected + input when sealed items are in it
    # (router_svc.compaction: opened compaction summaries and reasoning), and the compaction
    # item of a turn that compacted its history (context_management); None otherwise.
    model_input: list[dict[str, Any]] | None = None
    compacted: dict[str, Any] | None = None
    # A streamed turn's running form, stored beside the stream (router_svc.running); None when
    # it is not (not streamed, not stored, or --store-running-streams off).
    running_put: running.Running | None = None

    def json_of(self, response: dict[str, Any]) -> bytes:
        """``response`` as the client is shown it, as JSON: the stored bytes when it is the
        response just stored and ``include`` hides nothing of it."""
        shown = include.response(response, self.req.include)
        if shown is self.stored_response:
            return self.stored_json
        return orjson.dumps(shown)

    @property
    def tool_resources(self) -> dict[str, str]:
        return {kind: p.resource_id for kind, p in self.prepared.tools.items() if p.resource_id}

    def model_items(self) -> list[dict[str, Any]]:
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
        if self.omitted_history_items:
            return {HISTORY_TRUNCATED_HEADER: str(self.omitted_history_items)}
        return {}


# --- retries: explicit Idempotency-Key and the official SDKs' retries ----------------------------

# A retry of an SDK call finds a first attempt that started in the same window of this many
# seconds or the one before (so at least this long ago): the SDK's default timeout (600 s) and
# back-off included.
RETRY_WINDOW_S = 900
_AUTO_PREFIX = "sdk-retry:"


@dataclass(frozen=True)
class Identity:
    """What tells a POST /v1/responses apart from a retry of an earlier one (README, "Retries").

    ``kind`` is "explicit" (an Idempotency-Key), "first" (the first attempt of an official SDK's
    call: stored under ``idempotency_key`` so that its retries find it), "retry" (a later attempt
    of one: ``lookup`` holds the keys its first attempt may be stored under) or "" (neither).
    """

    kind: str = ""
    idempotency_key: str = ""
    response_id: str = ""
    lookup: tuple[str, ...] = ()
    # With an Idempotency-Key: the response ids a first request with the same body has.
    accepted_ids: frozenset[str] = field(default_factory=frozenset)


NO_IDENTITY = Identity()


def identify(
    tenant: str,
    raw: bytes,
    body: Mapping[str, Any],
    key: str,
    attempt: int | None,
    *,
    store: bool,
    now: float | None = None,
) -> Identity:
    """The identity of a request with body ``raw`` (``body`` parsed), Idempotency-Key ``key``
    (empty for none) and SDK attempt ``attempt`` (None for other clients)."""
    if key:
        # The body's digest is part of the response id, so that the same key with another body
        # is told apart (a 400) from a retry; the body is compared as JSON, not as bytes.
        digest = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
        response_id = _digest_id(f"{tenant}\x00{key}\x00{digest}")
        return Identity(
            kind="explicit",
            idempotency_key=key,
            response_id=response_id,
            lookup=(key,) if store else (),
            accepted_ids=frozenset({response_id, _response_id(tenant, key)}),
        )
    if attempt is None or not store:
        return NO_IDENTITY
    # An official SDK sends a retry with the same body bytes and no id of its call, so the
    # tenant, the body and the time tell it apart.
    body_hash = hashlib.sha256(tenant.encode() + b"\x00" + raw).hexdigest()[:40]
    window = int((time.time() if now is None else now) // RETRY_WINDOW_S)
    auto_key = f"{_AUTO_PREFIX}{body_hash}:{window}"
    if attempt == 0:
        return Identity(kind="first", idempotency_key=auto_key)
    return Identity(
        kind="retry",
        idempotency_key=auto_key,
        response_id=_retry_id(auto_key),
        lookup=(auto_key, f"{_AUTO_PREFIX}{body_hash}:{window - 1}"),
    )


def _digest_id(text: str) -> str:
    return "resp_" + hashlib.sha256(text.encode()).hexdigest()[:48]


def _retry_id(auto_key: str) -> str:
    """The response id of every retry of the calls whose first attempt has ``auto_key``: two
    retries running at once store one turn."""
    return _digest_id(f"retry\x00{auto_key}")


def idempotency_key_reused() -> errors.InvalidRequest:
    return errors.InvalidRequest(
        "This Idempotency-Key was already used for a request with other content.",
        code="idempotency_key_reused",
    )


async def find_first(svc: Services, tenant: str, ident: Identity) -> dict[str, Any] | None:
    """The response a first request of this one already stored (an Idempotency-Key's, or the
    first attempt of an SDK call), if any; a 400 for an Idempotency-Key used with another body."""
    for key in ident.lookup:
        first = await find_idempotent(svc, tenant, key)
        if first is not None and running.unfinished_stream(first):
            # A first attempt still streaming answers this one once it ended; one that failed
            # does not answer an SDK's retry, which runs on its own.
            first = await running.when_done(svc, tenant, first)
            status = first.get("status")
            if status == "in_progress" or (status == "failed" and ident.kind == "retry"):
                continue
        if first is None:
            continue
        if ident.kind == "explicit" and first.get("id") not in ident.accepted_ids:
            raise idempotency_key_reused()
        return first
    return None


async def find_idempotent(svc: Services, tenant: str, key: str) -> dict[str, Any] | None:
    """The response already stored for this Idempotency-Key, if any."""
    reply = await svc.state.find(
        svc.state.get_response(state_records.get_response(tenant, idempotency_key=key))
    )
    if reply is None:
        return None
    return state_records.response_of(reply.response)


async def begin(
    svc: Services,
    req: TurnRequest,
    *,
    tenant: str,
    idempotency_key: str = "",
    headers: Mapping[str, str] | None = None,
    ident: Identity | None = None,
    response_id: str = "",
    prepare_tools: bool = True,
) -> Turn:
    """Steps 2 and 3: the history, then the bootstrap.

    ``ident`` says how the turn is told from a retry (an ``idempotency_key`` alone is an
    explicit one); ``response_id`` keeps the id of an earlier attempt of this turn;
    ``prepare_tools=False`` calls no bootstrap service (a turn only counted, never run)."""
    if ident is None:
        ident = identify(tenant, b"", req.body, idempotency_key, None, store=req.store)
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
    history: list[dict[str, Any]] = []
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
    compaction.open_turn(svc, turn)
    return turn


async def resolve_references(
    svc: Services, tenant: str, req: TurnRequest, history: list[dict[str, Any]]
) -> TurnRequest:
    """The request with each item reference of its input replaced, in place, by the item it
    names, as stored: from the turn's history when the item is there (its newest copy), else
    from the tenant's stored response and conversation items, in one GetItems call for all of
    them. An id the tenant has no item for is a 400 naming the reference (``input[2]``).

    The resolved items are stored as the turn's input like any input item, except in a
    conversation: an item already in the conversation (its history, or earlier in this input)
    is sent to the model but not stored again, since a conversation holds an id once."""
    wanted = {str(req.input_items[i]["id"]) for i in req.references}
    known: dict[str, dict[str, Any]] = {}
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


def _response_id(tenant: str, idempotency_key: str) -> str:
    """A new response id; with an Idempotency-Key, the same one on every retry. (Turns stored
    with an Idempotency-Key before the body's digest was part of the id have this id.)"""
    if idempotency_key:
        digest = hashlib.sha256(f"{tenant}\x00{idempotency_key}".encode()).hexdigest()[:48]
        return f"resp_{digest}"
    return new_id("resp")


def _selected_headers(svc: Services, headers: Mapping[str, str]) -> dict[str, str]:
    wanted = [h.strip().lower() for h in svc.settings.bootstrap_headers.split(",") if h.strip()]
    return {name: headers[name] for name in wanted if name != "authorization" and name in headers}


async def store(
    svc: Services,
    turn: Turn,
    response: dict[str, Any],
    events: EventLog | None = None,
    *,
    in_progress: bool = False,
    keep_output: bool = True,
) -> dict[str, Any]:
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
    response_json = orjson.dumps(response)
    log = events.dump(response) if events is not None else b""
    large = state_records.large_turn(response_json, log)
    # The state service takes the items of a large turn from the response JSON when it can:
    # the answer then goes once (and is encoded here only for the history cache).
    derived = large and keep_output and svc.state.response_json_with_output_items
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
        response_json=response_json,
        events_json=log,
        encoded=large,
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
    try:
        reply = await svc.state.put_turn(
            request, param="previous_response_id" if turn.req.previous_response_id else None
        )
    except errors.Conflict as exc:
        if exc.code == "conflict" and turn.idempotency_key:
            # A concurrent request with the same key (and response id) stored its turn first.
            winner = await find_idempotent(svc, turn.tenant, turn.idempotency_key)
            if winner is not None:
                return winner
        raise
    except errors.ApiError as exc:
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
    if reply.replayed and reply.response.id != turn.response_id:
        first = state_records.response_of(reply.response)
        if turn.key_kind == "explicit" and first.get("id") != _response_id(
            turn.tenant, turn.idempotency_key
        ):
            raise idempotency_key_reused()
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
        if turn.key_kind == "first" and reply.response.id != _retry_id(turn.idempotency_key):
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


async def complete(svc: Services, turn: Turn) -> dict[str, Any]:
    """Steps 4 and 5 without streaming."""
    return await store(svc, turn, await answer(svc, turn))


async def answer(svc: Services, turn: Turn) -> dict[str, Any]:
    """Step 4 without streaming: the hub's answer as a Response object."""
    if compaction.compact_threshold(turn.req) is not None:
        return await _compacting_answer(svc, turn)
    return await _answer(svc, turn)


async def _compacting_answer(svc: Services, turn: Turn) -> dict[str, Any]:
    """A turn with context_management: its history compacted first when it is too long (the
    compaction item leads the output)."""
    lead = None if tools.runs_tools(svc, turn) else await compaction.answer_lead(svc, turn)
    response = await _answer(svc, turn)
    if lead is not None:
        response["output"].insert(0, lead)
    return response


async def _answer(svc: Services, turn: Turn) -> dict[str, Any]:
    if tools.runs_tools(svc, turn):
        return await tools.answer(svc, turn)  # code_interpreter and shell run in a tool loop
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


def _translated(svc: Services, turn: Turn, upstream: Any) -> dict[str, Any]:
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


def snapshot(turn: Turn, status: str, **fields: Any) -> dict[str, Any]:
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


async def start_background(svc: Services, turn: Turn) -> dict[str, Any]:
    """Stores the turn as a queued background response and runs it (router_svc.background:
    a durable job held by a lease, taken over by another router if this one dies); returns the
    queued response at once."""
    from router_svc import background  # imports this module

    return await background.start(svc, turn)


_END = object()
# The terminal events of a turn that is stored; response.failed is not (nothing half-stored).
_STORED_TERMINALS = frozenset({"response.completed", "response.incomplete"})


async def open_stream(svc: Services, turn: Turn) -> AsyncIterator[bytes]:
    """Steps 4 and 5 with streaming; returns the SSE byte stream for the client.

    As at OpenAI, ``response.created`` and ``response.in_progress`` go out as soon as the turn is
    accepted, before the hub answers; a hub that fails then ends the stream with ``error`` and
    ``response.failed``. The hub is read by a task of its own: if the client goes away
    mid-stream, the task still reads the hub to the end and stores the turn (the turn is not
    lost). The terminal event (``response.completed``) is sent only after the turn was stored,
    so a request chained on it right away finds it; ``data: [DONE]`` follows it. Meanwhile the
    turn is retrievable as ``in_progress`` (router_svc.running), and a failure is stored then.
    """
    translator = _translator(svc, turn)
    queue = _Outbox(backlog=STREAM_BACKLOG)
    pump = _pump(svc, turn, translator, queue)
    if turn.req.background:
        svc.spawn_cancellable((turn.tenant, turn.response_id), pump)
    else:
        svc.spawn(pump)
    return _drain(queue)


def _translator(svc: Services, turn: Turn) -> StreamTranslator | tools.StreamLoop:
    if tools.runs_tools(svc, turn):
        return tools.StreamLoop(svc, turn)  # code_interpreter and shell run in a tool loop
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


# A conversation turn whose conversation changed after its history was read (VERSION_MISMATCH) is
# run again on the new history this many times in all before the client gets the 409.
CONVERSATION_ATTEMPTS = 6


async def settle(
    svc: Services,
    req: TurnRequest,
    *,
    tenant: str,
    ident: Identity,
    headers: Mapping[str, str] | None = None,
    lock: AbstractAsyncContextManager[Any] | None = None,
) -> tuple[Turn, dict[str, Any] | list[bytes]]:
    """Steps 2 to 5 for a turn whose answer is held until it is stored: a conversation turn
    (whole, or streamed into a buffer) and a streamed SDK retry. Returns the turn and its answer
    (the response, or the stream's bytes).

    A conversation turn that loses the race for the conversation (another turn was appended
    after its history was read) is run again on the new history, up to CONVERSATION_ATTEMPTS
    times, with the same response id; only then is it a 409, before any byte was sent. ``lock``
    (held around all of it) serializes the turns of one conversation in this router, so that
    they do not call the hub only to lose the race.
    """
    response_id = ""
    async with lock or nullcontext():
        for attempt in range(CONVERSATION_ATTEMPTS):
            t = await begin(
                svc, req, tenant=tenant, headers=headers, ident=ident, response_id=response_id
            )
            response_id = t.response_id
            try:
                if not req.stream:
                    return t, await complete(svc, t)
                return t, await buffered_stream(svc, t)
            except errors.Conflict as exc:
                if exc.code != "conversation_locked" or attempt == CONVERSATION_ATTEMPTS - 1:
                    raise
            log.info("conversation changed under a turn; running it again on the new history")
            await asyncio.sleep(_jitter.uniform(0.0, 0.01 * 2**attempt))
    raise AssertionError("unreachable")


async def buffered_stream(svc: Services, turn: Turn) -> list[bytes]:
    """Steps 4 and 5 with streaming, nothing sent before the turn is stored: the stream's bytes.

    A failure to store is raised (an HTTP error, before any byte: a conversation that changed
    meanwhile is a 409 the caller may run again); a turn that another response answers (the
    first attempt of an SDK call this one retries) is that response's stream."""
    queue = _Outbox(backlog=0)
    outcome = await _pump(svc, turn, _translator(svc, turn), queue, buffered=True)
    if outcome.store_error is not None:
        raise outcome.store_error
    if outcome.holder is not None:
        held = replay_events(outcome.holder)
        return [
            *(sse_encode(e) for e in include.events(held, outcome.holder, turn.req.include)),
            SSE_DONE,
        ]
    chunks: list[bytes] = []
    while True:
        item = queue.get_nowait()
        if item is _END:
            chunks.append(SSE_DONE)
            return chunks
        assert isinstance(item, dict)
        chunks.append(sse_encode(item))


@dataclass
class _Outcome:
    """How a buffered stream ended other than with its own events."""

    # Storing the turn failed (nothing was sent yet).
    store_error: errors.ApiError | None = None
    # Another response answers this request (see store).
    holder: dict[str, Any] | None = None


async def _pump(
    svc: Services,
    turn: Turn,
    translator: StreamTranslator | tools.StreamLoop,
    queue: _Outbox,
    *,
    buffered: bool = False,
) -> _Outcome:
    outcome = _Outcome()
    sent = EventLog()  # what the client was sent, for the stored log
    held: list[dict[str, Any]] = []

    def push(events: list[dict[str, Any]]) -> None:
        for event in events:
            if event["type"] in _STORED_TERMINALS:
                held.append(event)  # goes out only once the turn is stored
                continue
            sent.add(event)
            queue.put_nowait(event)  # encoded when the client takes it (see _drain)

    started = translator.start()
    push(started)
    if not buffered:
        _announce_running(svc, turn, started)
    chunks: AsyncIterator[dict[str, Any]] | None = None
    try:
        # Inside the try: a request the translation refuses ends the stream like a hub failure.
        if isinstance(translator, tools.StreamLoop):
            chunks = translator.rounds()  # each hub call of the loop, and the calls it runs
        else:
            if compaction.compact_threshold(turn.req) is not None:
                await compaction.stream_lead(svc, turn, translator, push)
            path, body = turn.upstream(svc.dialect, stream=True)
            chunks = svc.hub.stream(path, body)
        async for chunk in chunks:
            push(translator.feed(chunk))
            await queue.room()
        push(translator.finish())
        if not held:
            # The hub's own response.failed (a Responses-API hub): a background turn is kept
            # as failed, never left in progress.
            await _store_failed(svc, turn, translator.response)
        if held:
            terminal = held[0]
            try:
                sent.add(terminal)
                answered = await store(svc, turn, translator.response, sent)
            except errors.ApiError as exc:
                log.error(
                    "streamed turn could not be stored",
                    extra={"code": exc.code, "detail": exc.message},
                )
                if buffered:
                    outcome.store_error = exc
                elif exc.outcome_unknown:
                    push([_unknown_outcome(terminal, turn, exc)])
                else:
                    push(_failed_after(terminal, translator.response, exc))
                return outcome
            if answered is not translator.response:
                if answered.get("id") != turn.response_id:
                    # What is stored for this request is another response (the first attempt of
                    # the SDK call this one retries, or the retry of this one).
                    if buffered:
                        outcome.holder = answered
                    else:
                        push(_failed_after(terminal, translator.response, _superseded(answered)))
                    return outcome
                terminal = {**terminal, "response": include.response(answered, turn.req.include)}
            queue.put_nowait(terminal)
    except errors.ApiError as exc:
        push(translator.fail(exc.code or "server_error", exc.message))
        await _store_failed(svc, turn, translator.response)
    except Exception:
        log.exception("streamed turn failed")
        push(translator.fail("server_error", "The gateway failed while streaming the response."))
        await _store_failed(svc, turn, translator.response)
    except asyncio.CancelledError:
        if svc.shutting_down:
            await _store_failed(svc, turn, _shut_down(turn))
        raise
    finally:
        queue.put_nowait(_END)
        if turn.running_put is not None:
            turn.running_put.stop()
        if chunks is not None:
            await _close(chunks)
    return outcome


def _announce_running(svc: Services, turn: Turn, started: list[dict[str, Any]]) -> None:
    """Stores the turn as in progress beside the stream, from its response.created."""
    if started and started[0]["type"] == "response.created" and svc.settings.store_running_streams:
        turn.running_put = running.announce(svc, turn, started[0]["response"])


def _shut_down(turn: Turn) -> dict[str, Any]:
    message = "The gateway was stopped before this response finished; send it again."
    return snapshot(turn, "failed", error=error_object("server_error", message))


async def _store_failed(svc: Services, turn: Turn, response: dict[str, Any]) -> None:
    """The failure of a background turn, or of a streamed turn stored as running, is kept (it is
    retrievable as failed, never left in progress); any other failed turn stores nothing. The
    partial output of a failed foreground stream is shown but not stored as output items, so no
    later turn builds on it."""
    if not turn.req.background and turn.running_put is None:
        return
    try:
        await store(svc, turn, response, keep_output=turn.req.background)
    except errors.ApiError as exc:
        log.error("failed response could not be stored", extra={"code": exc.code})


async def _close(chunks: AsyncIterator[dict[str, Any]]) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()


def _failed_after(
    terminal: dict[str, Any], response: dict[str, Any], exc: errors.ApiError
) -> list[dict[str, Any]]:
    """The error events that replace ``response.completed`` when storing the turn failed."""
    seq = int(terminal.get("sequence_number", 0))
    error = {"code": exc.code or "server_error", "message": exc.message}
    failed = {**response, "status": "failed", "error": error}
    return [
        {
            "type": "error",
            "sequence_number": seq,
            "code": error["code"],
            "message": exc.message,
            "param": None,
        },
        {"type": "response.failed", "sequence_number": seq + 1, "response": failed},
    ]


def _unknown_outcome(terminal: dict[str, Any], turn: Turn, exc: errors.ApiError) -> dict[str, Any]:
    """The terminal event of a stream whose turn may or may not have been stored: an ``error``
    that says so, and no response.failed (which could contradict a stored turn)."""
    return {
        "type": "error",
        "sequence_number": int(terminal.get("sequence_number", 0)),
        "code": "store_outcome_unknown",
        "message": (
            f"The response was answered, but whether it was stored is unknown ({exc.code}): "
            f"GET /v1/responses/{turn.response_id} tells."
        ),
        "param": None,
    }


def _superseded(answered: dict[str, Any]) -> errors.ApiError:
    return errors.ApiError(
        f"This request was answered and stored as response '{answered.get('id')}' by another "
        "attempt of the same call; this response was not stored.",
        code="superseded",
        status=409,
    )


# Events a streamed turn holds for a client that reads slower than the hub answers; past it the
# hub is read no faster than the client reads (see _Outbox).
STREAM_BACKLOG = 256
# A client that took nothing for this long is not waited for any more.
STREAM_STALL_S = 30.0


class _Outbox(asyncio.Queue[object]):
    """The events of a streamed turn on their way to the client. The pump waits in
    :meth:`room` while more than ``backlog`` are waiting (so that the hub is read no faster than
    the client reads, and a slow client does not make the router hold the whole answer as
    events), except once the client is gone (:meth:`close`) or took nothing for
    STREAM_STALL_S: the turn is then read to its end and stored all the same. A backlog of 0
    never waits (a buffered stream, read once it is whole)."""

    def __init__(self, *, backlog: int) -> None:
        super().__init__()
        self.backlog = backlog
        self._room = asyncio.Event()

    async def room(self) -> None:
        while self.backlog and self.qsize() > self.backlog:
            self._room.clear()
            try:
                await asyncio.wait_for(self._room.wait(), STREAM_STALL_S)
            except TimeoutError:
                self.close()

    def taken(self) -> None:
        if self.qsize() <= self.backlog // 2:
            self._room.set()

    def close(self) -> None:
        """Nobody reads any more: the pump never waits again."""
        self.backlog = 0
        self._room.set()


async def _drain(queue: _Outbox) -> AsyncIterator[bytes]:
    try:
        while True:
            item = await queue.get()
            queue.taken()
            if item is _END:
                yield SSE_DONE
                return
            assert isinstance(item, dict)
            # Encoded only now: the texts of the last events (each a copy of the answer) are
            # held as bytes one at a time, not all at once.
            for piece in sse_pieces(item):
                yield piece
    finally:
        queue.close()
