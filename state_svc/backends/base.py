"""The storage backend contract of the state service, and what every backend shares.

A backend stores plain dataclasses (items keep their JSON as bytes), never API messages; the
servicer converts at the boundary. Backend errors are the classes of ``state_svc.errors``, built
with its constructors so every backend words them the same way.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import orjson

from state_svc import errors

MICROS = 1_000_000


@dataclass(frozen=True, slots=True)
class Item:
    """One stored item. ``sequence`` is the conversation sequence number, or the 1-based
    position inside a stored response; 0 on writes, where the backend assigns it."""

    id: str
    # A view of the request received in a turn being written (its output items, see Turn), or
    # of the buffer a long item was read into (PostgreSQL's get_response).
    json: bytes | memoryview
    sequence: int = 0
    create_time_us: int = 0


@dataclass(frozen=True, slots=True)
class Turn:
    """One stored response with its own input and output items."""

    id: str
    # The JSON of a turn being written (and its output items') may be a view of the request
    # received (state_svc.wire): written as it is, never kept past the call (see owned). A
    # long value read back by PostgreSQL's get_response is a view of the buffer it was read
    # into, a piece at a time.
    response_json: bytes | memoryview
    previous_response_id: str = ""
    conversation_id: str = ""
    input_items: Sequence[Item] = ()
    output_items: Sequence[Item] = ()
    idempotency_key: str = ""
    create_time_us: int = 0
    expire_time_us: int | None = None
    stream_events_json: bytes | memoryview = b""
    in_progress: bool = False


@dataclass(frozen=True, slots=True)
class PutTurnResult:
    turn: Turn
    replayed: bool
    conversation_version: int


@dataclass(frozen=True, slots=True)
class History:
    """A resolved history, oldest first; ``omitted`` items were cut from its old end."""

    items: Sequence[Item]
    omitted: int = 0
    conversation_version: int = 0
    response_ids: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class Conversation:
    id: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    version: int = 0
    create_time_us: int = 0
    expire_time_us: int | None = None


@dataclass(frozen=True, slots=True)
class CreatedConversation:
    conversation: Conversation
    items: Sequence[Item]
    # True when the request_id was used before with the same content: nothing was written.
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class AppendResult:
    items: Sequence[Item]
    conversation_version: int
    replayed: bool


@dataclass(frozen=True, slots=True)
class ItemPage:
    items: Sequence[Item]
    has_more: bool


@dataclass(frozen=True, slots=True)
class Event:
    """One event of a response's event log: its sequence number and its JSON object."""

    sequence: int
    json: bytes


@dataclass(frozen=True, slots=True)
class Job:
    """The job of a background response as a claim sees it (see BackgroundJob in the proto)."""

    tenant: str
    response_id: str
    spec: bytes
    lease_token: int
    owner: str
    lease_expire_us: int
    last_sequence: int
    create_time_us: int


@dataclass(frozen=True, slots=True)
class EnqueueResult:
    put: PutTurnResult
    job: Job | None  # set when the caller holds the job's lease


@dataclass(frozen=True, slots=True)
class Renewal:
    lease_expire_us: int  # 0 when cancelled
    cancel_requested: bool


@dataclass(frozen=True, slots=True)
class CancelResult:
    turn: Turn
    cancelled: bool


@dataclass(frozen=True, slots=True)
class EventPage:
    """Events after a sequence number, read together with whether the response is final (one
    snapshot: a final response's log is complete)."""

    events: Sequence[Event]
    final: bool


@dataclass(frozen=True, slots=True)
class JobState:
    """What the rows of a response and its job say, for the lease checks below."""

    pk: int
    running: bool
    has_job: bool
    lease_token: int = 0
    done: bool = False
    cancelled: bool = False
    finished_token: int = 0
    owner: str = ""


@dataclass(frozen=True, slots=True)
class Compaction:
    """A compaction item's summary, kept so that any router can restore the item (see
    PutCompaction in the proto)."""

    id: str
    summary: bytes
    create_time_us: int = 0
    expire_time_us: int | None = None


@dataclass(frozen=True, slots=True)
class PutCompactionResult:
    compaction: Compaction
    replayed: bool


class Backend(Protocol):
    """Where the state service keeps responses and conversations. Every method is scoped to a
    tenant, and every lookup treats expired rows as absent."""

    async def put_turn(
        self,
        tenant: str,
        turn: Turn,
        *,
        expected_conversation_version: int | None,
        require_intact_chain: bool = False,
    ) -> PutTurnResult:
        """Stores a turn (see PutTurn in the proto). With ``require_intact_chain`` a new turn's
        whole chain, from its previous response back to the first turn, must be live and linked
        as GetHistory walks it (:func:`check_chain`), or nothing is stored (HISTORY_BROKEN). It
        is checked where the previous response is: a replay, or the replacement of a running
        turn, stores nothing new on the chain and answers as without it."""
        ...

    async def get_response(
        self,
        tenant: str,
        *,
        response_id: str = "",
        idempotency_key: str = "",
        with_items: bool = True,
    ) -> Turn:
        """The stored response (see GetResponse in the proto). Without ``with_items`` the
        caller needs none of its items, and a backend may leave them out (a long answer's
        output item is as long as the answer)."""
        ...

    async def response_history(self, tenant: str, response_id: str, *, limit: int) -> History:
        """The chain ending at ``response_id`` in one query; ``limit`` 0 means all items."""
        ...

    async def conversation_history(
        self, tenant: str, conversation_id: str, *, limit: int
    ) -> History: ...

    async def get_items(self, tenant: str, item_ids: Sequence[str]) -> dict[str, Item]:
        """The newest live copy of each of ``item_ids`` (distinct) the tenant stored in a final
        response or a conversation, by id (see GetItems in the proto and
        :func:`newest_items`); ids not found are left out. One indexed lookup per id."""
        ...

    async def delete_response(self, tenant: str, response_id: str) -> None: ...

    async def create_conversation(
        self, tenant: str, metadata: Mapping[str, str], items: Sequence[Item], request_id: str
    ) -> CreatedConversation: ...

    async def get_conversation(self, tenant: str, conversation_id: str) -> Conversation: ...

    async def get_conversation_by_request(self, tenant: str, request_id: str) -> Conversation:
        """The live conversation that create_conversation made with ``request_id``."""
        ...

    async def update_conversation(
        self, tenant: str, conversation_id: str, metadata: Mapping[str, str]
    ) -> Conversation: ...

    async def delete_conversation(self, tenant: str, conversation_id: str) -> None: ...

    async def append_items(
        self,
        tenant: str,
        conversation_id: str,
        items: Sequence[Item],
        *,
        expected_version: int | None,
    ) -> AppendResult: ...

    async def list_items(
        self,
        tenant: str,
        conversation_id: str,
        *,
        descending: bool,
        limit: int,
        after_sequence: int | None,
        after_item_id: str,
    ) -> ItemPage:
        """One page keyed on the sequence: ``after_sequence`` (from a page token) wins over
        ``after_item_id``; ``has_more`` says whether another page follows."""
        ...

    async def get_item(self, tenant: str, conversation_id: str, item_id: str) -> Item: ...

    async def delete_item(
        self, tenant: str, conversation_id: str, item_id: str
    ) -> Conversation: ...

    async def sweep(self) -> int:
        """Deletes expired responses, conversations and compactions; returns how many rows
        went."""
        ...

    # --- compaction summaries (see PutCompaction in the proto) -------------------------------

    async def put_compaction(self, tenant: str, compaction: Compaction) -> PutCompactionResult:
        """Stores a summary unless a live one has its id (:func:`stored_compaction`)."""
        ...

    async def get_compaction(self, tenant: str, compaction_id: str) -> Compaction:
        """The live summary with this id, or NOT_FOUND (ITEM_NOT_FOUND)."""
        ...

    # --- background responses (see "Background responses" in the proto) ---------------------

    async def enqueue_job(
        self,
        tenant: str,
        turn: Turn,
        spec: bytes,
        *,
        owner: str,
        lease_us: int,
        require_intact_chain: bool,
        max_pending_per_tenant: int,
        max_pending_total: int,
    ) -> EnqueueResult:
        """Stores a running turn and its job at once (claimed by ``owner`` when set), after
        the caps (:func:`check_pending`)."""
        ...

    async def claim_job(
        self, tenant: str, owner: str, lease_us: int, request_id: str
    ) -> Job | None:
        """Claims the oldest claimable job of ``tenant`` ('' for any tenant), or None; a
        replay of ``request_id`` returns the job that claim got while it still holds it."""
        ...

    async def renew_lease(
        self, tenant: str, response_id: str, lease_token: int, lease_us: int
    ) -> Renewal: ...

    async def append_events(
        self, tenant: str, response_id: str, lease_token: int, events: Sequence[Event]
    ) -> int:
        """Appends to the log for the current holder; returns the log's last sequence."""
        ...

    async def finish_job(
        self, tenant: str, turn: Turn, lease_token: int, events: Sequence[Event]
    ) -> PutTurnResult:
        """The holder's final turn, with the last events, its stream events set to the log."""
        ...

    async def cancel_job(self, tenant: str, turn: Turn, cancel_event: bytes) -> CancelResult: ...

    async def read_events(
        self, tenant: str, response_id: str, *, after: int, limit: int
    ) -> EventPage: ...

    async def close(self) -> None: ...


# --- time and ids -------------------------------------------------------------------------


def now_us() -> int:
    return time.time_ns() // 1000


def expire_at(now: int, retention_s: float) -> int | None:
    """The expiry of a row written at ``now``; None keeps it forever."""
    return now + int(retention_s * MICROS) if retention_s > 0 else None


def live(expire_time_us: int | None, now: int) -> bool:
    return expire_time_us is None or expire_time_us > now


def new_conversation_id() -> str:
    return "conv_" + secrets.token_hex(24)


# --- content digests for idempotency -----------------------------------------------------


class _Digest:
    """Length-prefixed fields, so that no two different contents hash alike by concatenation."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def add(self, data: bytes | memoryview | str | int) -> None:
        if isinstance(data, int):
            data = str(data)
        if isinstance(data, str):
            data = data.encode()
        self._h.update(len(data).to_bytes(8, "big"))
        self._h.update(data)

    def add_items(self, items: Sequence[Item]) -> None:
        self.add(len(items))
        for item in items:
            self.add(item.id)
            self.add(item.json)

    def digest(self) -> bytes:
        return self._h.digest()


def owned(turn: Turn) -> Turn:
    """``turn`` with its JSON as bytes of its own (not views of a request, see Turn)."""
    if (
        type(turn.response_json) is bytes
        and type(turn.stream_events_json) is bytes
        and all(type(i.json) is bytes for i in turn.output_items)
    ):
        return turn
    return replace(
        turn,
        response_json=bytes(turn.response_json),
        stream_events_json=bytes(turn.stream_events_json),
        output_items=tuple(replace(i, json=bytes(i.json)) for i in turn.output_items),
    )


def turn_digest(turn: Turn) -> bytes:
    """What makes two PutTurn calls "the same turn": every caller-set field, each length-prefixed
    as _Digest adds it (the same bytes, so stored digests still match), hashed in one pass: this
    runs for every stored turn."""
    parts: list[bytes | memoryview] = []
    add = parts.append
    for text in (turn.id, turn.previous_response_id, turn.conversation_id, turn.idempotency_key):
        encoded = text.encode()
        add(len(encoded).to_bytes(8, "big"))
        add(encoded)
    for data in (turn.response_json, turn.stream_events_json):
        add(len(data).to_bytes(8, "big"))
        add(data)
    add(_LENGTH_1)
    add(b"1" if turn.in_progress else b"0")
    for items in (turn.input_items, turn.output_items):
        count = str(len(items)).encode()
        add(len(count).to_bytes(8, "big"))
        add(count)
        for item in items:
            item_id = item.id.encode()
            add(len(item_id).to_bytes(8, "big"))
            add(item_id)
            add(len(item.json).to_bytes(8, "big"))
            add(item.json)
    h = hashlib.sha256()
    # One update per part only when a part is large: joining would copy it.
    if sum(len(part) for part in parts) < _JOIN_BYTES:
        h.update(b"".join(parts))
    else:
        for part in parts:
            h.update(part)
    return h.digest()


_LENGTH_1 = (1).to_bytes(8, "big")
# Below this many bytes a turn's digest input is joined and hashed in one call.
_JOIN_BYTES = 64 * 1024


def conversation_digest(metadata: Mapping[str, str], items: Sequence[Item]) -> bytes:
    """What makes two CreateConversation calls with one request_id "the same request"."""
    d = _Digest()
    d.add(len(metadata))
    for key in sorted(metadata):
        d.add(key)
        d.add(metadata[key])
    d.add_items(items)
    return d.digest()


# --- shared decisions ---------------------------------------------------------------------


def positioned(items: Iterable[Item], create_time_us: int) -> tuple[Item, ...]:
    """A response's items with their 1-based positions as sequence."""
    return tuple(Item(item.id, item.json, i, create_time_us) for i, item in enumerate(items, 1))


def stored_turn(turn: Turn, now: int, expire_time_us: int | None) -> Turn:
    """The turn as stored: server-set times, items numbered by position (built directly, not
    with dataclasses.replace, which costs several times more for every stored turn)."""
    return Turn(
        turn.id,
        turn.response_json,
        turn.previous_response_id,
        turn.conversation_id,
        positioned(turn.input_items, now),
        positioned(turn.output_items, now),
        turn.idempotency_key,
        now,
        expire_time_us,
        turn.stream_events_json,
        turn.in_progress,
    )


def classify_append(
    conversation_id: str, requested: Sequence[Item], existing: Mapping[str, Item]
) -> tuple[Item, ...] | None:
    """Decides whether an append of ``requested`` is new (None), a replay (the stored items, in
    the requested order) or a conflict (raises ITEM_ID_CONFLICT). ``existing`` holds the stored
    items of the conversation whose ids are among the requested ones."""
    if not existing:
        return None
    for item in requested:
        stored = existing.get(item.id)
        if stored is None or stored.json != item.json:
            clash = item.id if stored is not None else next(iter(existing))
            raise errors.item_id_conflict(conversation_id, clash)
    return tuple(existing[item.id] for item in requested)


def cut_oldest(items: Sequence[Item], limit: int) -> tuple[Sequence[Item], int]:
    """Keeps the newest ``limit`` items (all when 0); returns them and how many were left out."""
    if limit <= 0 or len(items) <= limit:
        return items, 0
    return items[len(items) - limit :], len(items) - limit


def check_version(conversation_id: str, expected: int | None, actual: int) -> None:
    if expected is not None and expected != actual:
        raise errors.version_mismatch(conversation_id, expected, actual)


def replacing_turn(running: Turn, turn: Turn) -> Turn:
    """``turn`` as it replaces the stored ``running`` turn: that turn's times and idempotency
    key, the new content. Raises INVALID_ARGUMENT when the turn moved to another chain or
    conversation. The backend stores the digest of ``turn`` as sent, so that a retry of the
    same call is a replay even when it carried no key or another one."""
    for name, stored, sent in (
        ("previous_response_id", running.previous_response_id, turn.previous_response_id),
        ("conversation_id", running.conversation_id, turn.conversation_id),
    ):
        if stored != sent:
            raise errors.invalid(
                f"response.{name}",
                f"response {turn.id} is running with {name} {stored!r}; the turn that replaces "
                f"it must keep it, not {sent!r}",
                response_id=turn.id,
            )
    return replace(
        stored_turn(turn, running.create_time_us, running.expire_time_us),
        idempotency_key=running.idempotency_key,
    )


@dataclass(frozen=True, slots=True)
class TurnLookup:
    """What the rows matching a new turn's id, previous id or idempotency key say."""

    replay: tuple[int, int] | None  # (pk, conversation version) of the turn to return instead
    expired: Sequence[int]  # pks of expired rows holding the id or the key, to delete first
    previous_live: bool
    previous_running: bool = False
    running: int | None = None  # pk of the stored running turn with this id, to replace

    def check_previous(self, turn: Turn) -> None:
        """Raises when a new turn's previous response is missing or still running."""
        if not turn.previous_response_id:
            return
        if not self.previous_live:
            raise errors.previous_response_not_found(turn.previous_response_id)
        if self.previous_running:
            raise errors.previous_response_in_progress(turn.previous_response_id)


def lookup_turn(turn: Turn, digest: bytes, rows: Iterable[Any], now: int) -> TurnLookup:
    """Decides a PutTurn from the rows (pk, id, idempotency key, digest, conversation version,
    expire time, in progress) of the tenant whose id is the turn's id or previous id, or whose
    key is the turn's key: the replacement of a running turn with the same id, a replay of the
    same id (or RESPONSE_ID_CONFLICT), a replay of the same key, or a new turn."""
    expired: list[int] = []
    by_key: tuple[int, int] | None = None
    previous_live = previous_running = False
    key = turn.idempotency_key
    for pk, rid, row_key, row_digest, version, expire, running in rows:
        if not live(expire, now):
            if rid == turn.id or (key and row_key == key):
                expired.append(pk)
            continue
        if rid == turn.id:
            if running:
                return TurnLookup(None, (), True, running=pk)
            if row_digest != digest:
                raise errors.response_id_conflict(turn.id)
            return TurnLookup((pk, version), (), True)
        if key and row_key == key:
            by_key = (pk, version)
        if rid == turn.previous_response_id:
            previous_live = True
            previous_running = bool(running)
    return TurnLookup(by_key, expired, previous_live, previous_running)


def check_chain(previous_id: str, chain: Sequence[tuple[str, str]]) -> None:
    """Raises HISTORY_BROKEN unless ``chain``, the (id, previous id) of the live responses
    reached from ``previous_id`` (oldest first, each older than the next), is whole: it starts
    at a first turn and each response names the one before it."""
    expected = ""
    for response_id, previous in chain:
        if previous != expected:
            raise errors.history_broken(previous_id, previous)
        expected = response_id
    if expected != previous_id:
        raise errors.previous_response_not_found(previous_id)


# --- compaction summaries -------------------------------------------------------------------


def stored_compaction(
    compaction: Compaction, existing: Compaction | None, now: int, retention_s: float
) -> PutCompactionResult:
    """Decides a PutCompaction from the live record with its id (``existing``, or None): a
    replay when its summary is the same (ITEM_ID_CONFLICT when not), else the record to store,
    with its server-set times."""
    if existing is not None:
        if existing.summary != compaction.summary:
            raise errors.compaction_conflict(compaction.id)
        return PutCompactionResult(existing, replayed=True)
    stored = replace(compaction, create_time_us=now, expire_time_us=expire_at(now, retention_s))
    return PutCompactionResult(stored, replayed=False)


# --- background jobs: the rules every backend applies ----------------------------------------


def check_pending(
    tenant_pending: int, total_pending: int, max_per_tenant: int, max_total: int
) -> None:
    """Raises BACKGROUND_QUEUE_FULL when one more background response would pass a cap."""
    for scope, pending, limit in (
        ("tenant", tenant_pending, max_per_tenant),
        ("total", total_pending, max_total),
    ):
        if limit > 0 and pending >= limit:
            raise errors.queue_full(scope, pending, limit)


def check_holder(state: JobState | None, response_id: str, lease_token: int) -> JobState:
    """The job's state when ``lease_token`` is its current lease; raises otherwise."""
    if state is None or not state.has_job:
        raise errors.response_not_found(response_id)
    if state.done or state.lease_token != lease_token:
        raise errors.lease_lost(
            response_id,
            lease_token,
            current=state.lease_token,
            done=state.done,
            cancelled=state.cancelled,
        )
    return state


def new_events(
    response_id: str, last: int, stored: Mapping[int, bytes], events: Sequence[Event]
) -> Sequence[Event]:
    """The events of an append that are not in the log yet. ``last`` is the log's last
    sequence (-1 when empty) and ``stored`` the stored events among the numbers sent; the
    servicer has checked that the numbers are consecutive."""
    if not events:
        return events
    if events[0].sequence > last + 1:
        raise errors.invalid(
            "events[0].sequence_number",
            f"the log of {response_id} ends at {last}: event {events[0].sequence} leaves a gap",
            response_id=response_id,
        )
    for event in events:
        if event.sequence > last:
            break
        if stored.get(event.sequence) != event.json:
            raise errors.event_conflict(response_id, event.sequence)
    return [e for e in events if e.sequence > last]


def joined_log(jsons: Iterable[bytes]) -> bytes:
    """The event log as a JSON array (a final turn's stream_events_json); empty for none."""
    jsons = list(jsons)
    return b"[" + b",".join(jsons) + b"]" if jsons else b""


def stamped(event_json: bytes, sequence: int) -> bytes:
    """A cancel event with the sequence number the server took for it."""
    event = orjson.loads(event_json)
    event["sequence_number"] = sequence
    return orjson.dumps(event)


# --- rows of the SQL backends' history queries ----------------------------------------------


def history_from_rows(response_id: str, rows: Sequence[Any]) -> History:
    """Builds a History from the rows of a chain query: per response, oldest first, one chain
    row (pk, id, prev, create time, -, -, -, -, -, in progress) then its items (pk, -, -, -,
    kind, position, item id, json, count of all items when the query kept only the newest, else
    NULL)."""
    if not rows:
        raise errors.response_not_found(response_id)
    response_ids: list[str] = []
    items: list[Item] = []
    total: int | None = None
    create_time = 0
    for row in rows:
        if row[4] is None:
            if row[9]:
                # Only the anchor can be running: no turn is ever stored on a running one.
                raise errors.response_in_progress(row[1])
            response_ids.append(row[1])
            create_time = row[3]
        else:
            items.append(Item(id=row[6], json=row[7], sequence=row[5], create_time_us=create_time))
            total = row[8]
    if rows[0][2]:
        # The oldest response reached still names a previous one: that link is gone.
        raise errors.history_broken(response_id, rows[0][2])
    omitted = total - len(items) if total is not None else 0
    return History(items=items, omitted=omitted, response_ids=response_ids)


def conversation_history_from_rows(conversation_id: str, rows: Sequence[Any]) -> History:
    """Builds a History from the newest-first rows (version, total, seq, id, json, create time)."""
    if not rows:
        raise errors.conversation_not_found(conversation_id)
    items = [
        Item(id=row[3], json=row[4], sequence=row[2], create_time_us=row[5])
        for row in reversed(rows)
        if row[2] is not None
    ]
    return History(items=items, omitted=rows[0][1] - len(items), conversation_version=rows[0][0])


# --- items by id (GetItems) -------------------------------------------------------------------

# Where a copy of an item is stored, as GetItems breaks a tie of times: a conversation's copy
# wins over a response's, since a turn's items are written to both at the same time.
RESPONSE_COPY = 0
CONVERSATION_COPY = 1


def newest_items(rows: Iterable[Any]) -> dict[str, Item]:
    """The newest copy of each item among ``rows`` (item id, json, create time, sequence, where
    it is stored, pk of its response or conversation): the latest create time, then a
    conversation's copy, then the later stored response or conversation."""
    best: dict[str, tuple[tuple[int, int, int], Item]] = {}
    for item_id, data, create_time_us, sequence, where, pk in rows:
        rank = (create_time_us, where, pk)
        held = best.get(item_id)
        if held is None or rank > held[0]:
            best[item_id] = (
                rank,
                Item(id=item_id, json=data, sequence=sequence, create_time_us=create_time_us),
            )
    return {item_id: item for item_id, (_, item) in best.items()}
