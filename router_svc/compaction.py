"""Compaction, and the sealed items of a turn's model input (router_svc.sealing).

``POST /v1/responses/compact`` and ``context_management: [{"type": "compaction",
"compact_threshold": N}]`` have the served model summarize a history. The summary is stored in
the state service (PutCompaction, under the tenant and the item's id, whatever the request's
``store``) and sealed into the ``compaction`` item's ``encrypted_content`` with the item's id as
its ref (router_svc.sealing). A router opens the sealed summary itself when it has the key; when
the key is not its own (another replica, a restart without ``--seal-keys``, a key rotated away)
it restores the summary from the state service by the ref, for the same tenant only, so the item
works on every replica while a changed content under a known key is still refused. A
Responses hub that has ``/responses/compact`` compacts by itself (its own compaction item is
passed through untouched, and ``context_management`` reaches it as given).

What the model is sent when its input holds a compaction item the gateway made: the user
messages that came before the latest compaction item, the summary (as a user message, where the
item was), then everything after the item. The assistant messages, tool calls, tool outputs and
reasoning before it are what the summary replaced, and are not sent.

Reasoning items whose ``encrypted_content`` the gateway minted (``include:
["reasoning.encrypted_content"]`` on a chat hub) are opened too: a chat hub gets the text back as
``reasoning_content`` on the assistant message that followed it (the chat template decides what
to keep); a Responses hub cannot take it, and the item is left out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from prometheus_client import Counter

from router_svc import errors, sealing, state_records, tokens, validate
from router_svc.dialects import chat
from router_svc.ids import new_id
from router_svc.services import Services
from router_svc.shapes import Item, ResponseObject, StreamEvent
from router_svc.validate import TurnRequest

if TYPE_CHECKING:
    from router_svc.bootstrap import Prepared

log = logging.getLogger(__name__)

RESTORED = Counter(
    "respgw_router_compactions_restored_total",
    "Compaction items whose summary was read from the state service because their sealed "
    "content was made with a key this router does not have (another replica's, or its own "
    "before a restart without --seal-keys).",
)

REASONING_INCLUDE = "reasoning.encrypted_content"

SUMMARY_PROMPT = (
    "You are compacting the conversation above so that it can continue without it. Write a "
    "summary that another assistant can pick the work up from: the user's goals and "
    "constraints, what was done and decided, the important facts, names, numbers, file paths "
    "and tool results, what is still open, and what the user asked for last. Write only the "
    "summary."
)
SUMMARY_HEADER = "Summary of the earlier conversation (it was compacted):\n\n"
# The estimate of a history's tokens when the hub's count is not at hand.
CHARS_PER_TOKEN = 4


class Turn(Protocol):
    """What compaction reads and sets of a turn (a :class:`router_svc.turn.Turn`): named here so
    that this module needs not import turn.py, which imports it."""

    req: TurnRequest
    tenant: str
    response_id: str
    created_at: int
    history: list[Item]
    prepared: Prepared
    # Set here: what the model is sent when sealed items are in it, and the compaction item of a
    # turn that compacted its history.
    model_input: list[Item] | None
    compacted: Item | None

    def model_items(self) -> list[Item]: ...


# --- the sealed items of a model input -----------------------------------------------------


async def compaction_item(svc: Services, tenant: str, summary: str, item_id: str = "") -> Item:
    """A ``compaction`` output item (a new id unless given) whose encrypted content seals
    ``summary`` for the tenant, the summary stored in the state service under its id first."""
    item_id = item_id or new_id("cmp")
    await svc.state.put_compaction(state_records.put_compaction(tenant, item_id, summary))
    sealed = svc.seal_keys().seal(
        orjson.dumps({"summary": summary}).decode(),
        tenant=tenant,
        purpose=sealing.COMPACTION,
        ref=item_id,
    )
    return {"id": item_id, "type": "compaction", "encrypted_content": sealed}


def has_sealed(items: Iterable[Mapping[str, Any]], history: Iterable[Mapping[str, Any]]) -> bool:
    """Whether a model input may hold a gateway-sealed item: a reasoning or compaction item in
    the input, or a compaction item in the history. A type check per item: cheap enough for
    every turn."""
    for item in items:
        if item.get("type") in _SEALABLE:
            return True
    for item in history:
        if item.get("type") == "compaction":
            return True
    return False


_SEALABLE = frozenset({"reasoning", "compaction"})


async def model_input(
    svc: Services,
    *,
    tenant: str,
    history: list[Item],
    injected: list[Item],
    input_items: list[Item],
    history_param: str,
    opened: Mapping[str, str] | None = None,
) -> list[Item]:
    """The items the model is sent (oldest first), with the gateway's sealed items opened.

    A sealed item of the caller's input that does not open is a 400 naming it
    (``input[2].encrypted_content``); one of the history, a 400 naming ``history_param``.
    ``opened`` gives summaries already known, by the item's encrypted content.
    """
    own_compaction = svc.dialect.own_compaction
    opens_reasoning = svc.dialect.seals_reasoning
    sealer = svc.seal_keys()
    out: list[Item] = []
    last_compaction = -1
    own = len(history) + len(injected)
    for position, item in enumerate((*history, *injected, *input_items)):
        kind = item.get("type")
        if position >= own:
            param = f"input[{position - own}].encrypted_content"
        else:
            param = history_param
        content = item.get("encrypted_content")
        if kind == "compaction":
            summary = (opened or {}).get(str(content))
            if summary is None and not sealing.is_sealed(content) and own_compaction:
                out.append(dict(item))  # the Responses hub's own compaction item
                continue
            if summary is None:
                summary = await open_summary(svc, tenant, str(content or ""), param)
            last_compaction = len(out)
            out.append(summary_message(summary))
        elif kind == "reasoning" and sealing.is_sealed(content):
            if position < own:
                continue  # stored reasoning is not replayed (as without sealing)
            text = sealer.open_or_refuse(
                str(content), tenant=tenant, purpose=sealing.REASONING, param=param
            )
            if opens_reasoning:
                out.append({"type": chat.OPENED_REASONING, "text": text})
        else:
            out.append(item)
    if last_compaction < 0:
        return out
    kept = [i for i in out[:last_compaction] if _is_user_message(i)]
    return [*kept, *out[last_compaction:]]


async def open_summary(svc: Services, tenant: str, content: str, param: str) -> str:
    """The summary a compaction item's encrypted content seals: opened with this router's key,
    or, when the key is not this router's and the content has a ref, read from the state service
    (the tenant's own records only). A 400 naming ``param`` when neither gives it: the content
    was changed under a known key, is another tenant's, or is not the gateway's at all."""
    sealer = svc.seal_keys()
    envelope = sealing.envelope(content)
    if envelope is not None and envelope.ref and not sealer.knows(envelope):
        request = state_records.get_compaction(tenant, envelope.ref)
        found = await svc.state.find(svc.state.get_compaction(request))
        if found is None:
            raise sealing.invalid_encrypted_content(param)
        RESTORED.inc()
        return found.compaction.summary.decode()
    opened = sealer.open_or_refuse(content, tenant=tenant, purpose=sealing.COMPACTION, param=param)
    return _summary(opened, param)


def summary_message(summary: str) -> Item:
    return {
        "type": "message",
        "role": "user",
        "content": [{"type": "input_text", "text": SUMMARY_HEADER + summary}],
    }


def _summary(payload: str, param: str) -> str:
    try:
        summary = orjson.loads(payload).get("summary")
    except (orjson.JSONDecodeError, AttributeError):
        summary = None
    if not isinstance(summary, str):
        raise sealing.invalid_encrypted_content(param)
    return summary


def _is_user_message(item: Mapping[str, Any]) -> bool:
    return (item.get("type") or "message") == "message" and item.get("role") == "user"


async def open_turn(svc: Services, turn: Turn) -> None:
    """Sets the turn's model input (:func:`model_input`); called only when sealed items may be
    in it (:func:`has_sealed`, checked by the caller so that other turns await nothing)."""
    req = turn.req
    turn.model_input = await model_input(
        svc,
        tenant=turn.tenant,
        history=turn.history,
        injected=turn.prepared.injected_items,
        input_items=req.input_items,
        history_param="conversation" if req.conversation_id else "previous_response_id",
    )


# --- reasoning minted for stateless clients ------------------------------------------------


def mints_reasoning(svc: Services, req: TurnRequest) -> bool:
    """Whether reasoning output items get the gateway's ``encrypted_content``: asked for with
    ``include``, on a chat hub (a Responses hub mints its own)."""
    return REASONING_INCLUDE in req.include and svc.dialect.seals_reasoning


def seal_reasoning(svc: Services, tenant: str, text: str) -> str:
    return svc.seal_keys().seal(text, tenant=tenant, purpose=sealing.REASONING)


def mint_reasoning(svc: Services, tenant: str, response: ResponseObject) -> None:
    """Gives each reasoning item of ``response`` its sealed reasoning text."""
    for item in response.get("output") or []:
        if item.get("type") == "reasoning" and not item.get("encrypted_content"):
            text = "".join(p.get("text", "") for p in item.get("content") or [])
            item["encrypted_content"] = seal_reasoning(svc, tenant, text)


# --- summarizing ---------------------------------------------------------------------------


async def summarize(
    svc: Services, model: str, items: list[Item], instructions: str | None
) -> tuple[str, dict[str, Any] | None]:
    """The served model's summary of ``items`` (a model input, sealed items opened), and the
    usage of the call."""
    prompt = svc.settings.compaction_prompt or SUMMARY_PROMPT
    dialect = svc.dialect
    answer = await svc.hub.post(
        dialect.path, dialect.summary_request(model, items, instructions, prompt)
    )
    text, usage = dialect.summary(answer)
    if not isinstance(text, str) or not text.strip():
        raise errors.UpstreamError(
            "The model server returned an empty summary; nothing was compacted.",
            code="upstream_malformed_response",
        )
    return text.strip(), usage


def _chars(items: Iterable[Mapping[str, Any]], instructions: str | None) -> int:
    """The characters of ``items`` as JSON (an upper bound of their text's)."""
    chars = len(instructions or "")
    for item in items:
        chars += len(orjson.dumps(item))
    return chars


async def count_tokens(svc: Services, req: TurnRequest, items: list[Item]) -> int | None:
    """The tokens of ``items`` as the hub's tokenizer counts them (the chat template applied),
    through :func:`tokens.count` and so by ``--tokenizer`` (a hub without a tokenizer is asked
    once in :data:`tokens.ABSENT_FOR_S`); None when it could only estimate or its tokenizer
    failed: the caller then estimates from the characters."""
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    messages += chat.chat_messages(items)
    try:
        count, how = await tokens.count(
            svc, "/chat/completions", {"model": req.model, "messages": messages}, model_given=True
        )
    except errors.ApiError as exc:
        log.warning("the hub's tokenizer failed; the compaction threshold is estimated: %s", exc)
        return None
    return count if how == "tokenizer" else None


# --- POST /v1/responses/compact ------------------------------------------------------------

_COMPACT_FIELDS = frozenset(
    {
        "model",
        "input",
        "instructions",
        "previous_response_id",
        "prompt_cache_key",
        "prompt_cache_options",
        "prompt_cache_retention",
        "service_tier",
        "image",
    }
)


def compact_request(body: object, *, default_model: str) -> TurnRequest:
    """A POST /v1/responses/compact body, checked as the same fields of POST /v1/responses are
    (fields of ResponseCompactParams only; others are ignored)."""
    if not isinstance(body, dict):
        return validate.parse_turn_request(body)  # the same 400
    fields = {k: v for k, v in body.items() if k in _COMPACT_FIELDS}
    return validate.parse_turn_request({**fields, "store": False}, default_model=default_model)


async def compact(svc: Services, turn: Turn) -> dict[str, Any]:
    """The ``response.compaction`` object of a compact request (``turn`` begun, not stored)."""
    req = turn.req
    items = turn.model_items()
    if svc.dialect.own_compaction:
        passed = await _hub_compact(svc, req, items)
        if passed is not None:
            return passed
    summary, usage = await summarize(svc, req.model, items, req.instructions)
    kept = [
        _as_output(i)
        for i in (*turn.history, *req.input_items)
        if i.get("type") in (None, "message") and i.get("role") == "user"
    ]
    return {
        "id": turn.response_id,
        "object": "response.compaction",
        "created_at": turn.created_at,
        "output": [*kept, await compaction_item(svc, turn.tenant, summary)],
        "usage": usage or chat.usage_from_chat({}),
    }


def _as_output(item: Mapping[str, Any]) -> Item:
    out = dict(item)
    out.setdefault("status", "completed")
    return out


async def _hub_compact(svc: Services, req: TurnRequest, items: list[Item]) -> dict[str, Any] | None:
    """The Responses hub's own compaction, or None when it has no /responses/compact."""
    body: dict[str, Any] = {"model": req.model, "input": items}
    if req.instructions is not None:
        body["instructions"] = req.instructions
    try:
        answer = await svc.hub.post("/responses/compact", body)
    except errors.ApiError as exc:
        if exc.code == "upstream_rejected" and ("(404)" in exc.message or "(405)" in exc.message):
            return None  # no compact endpoint: summarized like on a chat hub
        raise
    if answer.get("object") != "response.compaction" or not isinstance(answer.get("output"), list):
        raise errors.UpstreamError(
            "The model server's compaction answer is not a response.compaction object.",
            code="upstream_malformed_response",
        )
    return answer


# --- context_management: compaction during a turn ------------------------------------------


def compact_threshold(req: TurnRequest) -> int | None:
    """The ``compact_threshold`` of the request's compaction entry, if it has one."""
    for entry in req.body.get("context_management") or ():
        if entry.get("type") == "compaction" and entry.get("compact_threshold") is not None:
            threshold: int = entry["compact_threshold"]
            return threshold
    return None


async def needs_compaction(svc: Services, turn: Turn) -> bool:
    """Whether the turn's model input passes its compact_threshold (a chat hub only: a
    Responses hub gets context_management and compacts by itself).

    Fewer characters than the threshold are fewer tokens too: nothing is asked then. Otherwise
    the hub's tokenizer counts (:func:`count_tokens`), or, without one, the characters of the
    items' JSON at :data:`CHARS_PER_TOKEN`."""
    if svc.dialect.own_compaction or turn.compacted is not None:
        return False
    threshold = compact_threshold(turn.req)
    if threshold is None:
        return False
    items = turn.model_items()
    chars = _chars(items, turn.req.instructions)
    if chars < threshold:
        return False
    tokens = await count_tokens(svc, turn.req, items)
    if tokens is None:
        tokens = chars // CHARS_PER_TOKEN
    return tokens >= threshold


async def compact_turn(svc: Services, turn: Turn, item_id: str = "") -> Item:
    """Summarizes the turn's model input; the model is then sent the summary instead. Returns
    the compaction item, the first output item of the turn."""
    req = turn.req
    summary, _ = await summarize(svc, req.model, turn.model_items(), req.instructions)
    item = await compaction_item(svc, turn.tenant, summary, item_id)
    turn.model_input = await model_input(
        svc,
        tenant=turn.tenant,
        history=turn.history,
        injected=turn.prepared.injected_items,
        input_items=[*req.input_items, item],
        history_param="conversation" if req.conversation_id else "previous_response_id",
        opened={item["encrypted_content"]: summary},
    )
    turn.compacted = item
    log.info("history compacted during a turn", extra={"items": len(turn.model_items())})
    return item


async def answer_lead(svc: Services, turn: Turn) -> Item | None:
    """The compaction item that leads a non-streamed turn's output, when it compacted."""
    if not await needs_compaction(svc, turn):
        return None
    return await compact_turn(svc, turn)


async def stream_lead(
    svc: Services,
    turn: Turn,
    translator: object,
    push: Callable[[list[StreamEvent]], None],
) -> None:
    """Pushes the events of a streamed turn's compaction, when it compacts:
    ``response.output_item.added`` and ``response.compaction.compacting`` before the summary is
    made, ``response.output_item.done`` (with the sealed summary) after."""
    if not isinstance(translator, chat.ChatStreamTranslator) or not await needs_compaction(
        svc, turn
    ):
        return
    item_id = new_id("cmp")
    push(translator.open_compaction(item_id))
    push(translator.close_compaction(await compact_turn(svc, turn, item_id)))
