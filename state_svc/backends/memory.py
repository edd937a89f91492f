"""In-memory backend for tests and development: everything is lost on exit.

Each method runs to completion without awaiting, so on one event loop every call is atomic and
appends to a conversation are serialized without locks.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from state_svc import errors
from state_svc.backends import base
from state_svc.backends.base import (
    AppendResult,
    CancelResult,
    Compaction,
    Conversation,
    CreatedConversation,
    EnqueueResult,
    Event,
    EventPage,
    History,
    Item,
    ItemPage,
    Job,
    JobState,
    PutCompactionResult,
    PutTurnResult,
    Renewal,
    Turn,
)


@dataclass
class _Job:
    """A background response's job (see BackgroundJob in the proto)."""

    spec: bytes
    create_time_us: int
    owner: str = ""
    lease_token: int = 0
    lease_expire_us: int = 0  # 0: queued
    done: bool = False
    cancelled: bool = False
    finished_token: int = 0


@dataclass
class _Response:
    pk: int
    tenant: str
    turn: Turn
    digest: bytes
    conversation_version: int
    # A background response's job and event log go with its row (and so with its deletion).
    job: _Job | None = None
    events: list[bytes] = field(default_factory=list)


@dataclass
class _Conversation:
    tenant: str
    id: str
    metadata: dict[str, str]
    create_time_us: int
    expire_time_us: int | None
    request_id: str
    request_digest: bytes
    version: int = 0
    items: dict[int, Item] = field(default_factory=dict)
    seq_by_id: dict[str, int] = field(default_factory=dict)
    seqs: list[int] = field(default_factory=list)

    def public(self) -> Conversation:
        return Conversation(
            id=self.id,
            metadata=dict(self.metadata),
            version=self.version,
            create_time_us=self.create_time_us,
            expire_time_us=self.expire_time_us,
        )

    def append(self, items: Sequence[Item], now: int) -> tuple[Item, ...]:
        stored = []
        for item in items:
            self.version += 1
            row = Item(id=item.id, json=item.json, sequence=self.version, create_time_us=now)
            self.items[self.version] = row
            self.seq_by_id[item.id] = self.version
            self.seqs.append(self.version)
            stored.append(row)
        return tuple(stored)


class MemoryBackend:
    """Dictionaries keyed by (tenant, id); ``pk`` mirrors the SQL backends' insertion order."""

    def __init__(self, retention_s: float = 0.0) -> None:
        self._retention_s = retention_s
        self._pk = 0
        self._responses: dict[tuple[str, str], _Response] = {}
        self._keys: dict[tuple[str, str], str] = {}
        self._conversations: dict[tuple[str, str], _Conversation] = {}
        self._requests: dict[tuple[str, str], str] = {}
        # (tenant, response id) of the background responses whose job may not be finished.
        self._pending: set[tuple[str, str]] = set()
        # The job and lease token each claim got, by its request_id (for replays); a claim's
        # entry goes when its job is finished.
        self._claims: dict[str, tuple[tuple[str, str], int]] = {}
        # Where each (tenant, item id) was stored: (RESPONSE_COPY, response id) or
        # (CONVERSATION_COPY, conversation id). Entries are only added; get_items checks each
        # against the live rows and drops those that no longer hold the item.
        self._item_index: dict[tuple[str, str], set[tuple[int, str]]] = {}
        # Compaction summaries by (tenant, compaction id).
        self._compactions: dict[tuple[str, str], Compaction] = {}

    # --- lookups that hide expired rows ---------------------------------------------------

    def _response(self, tenant: str, response_id: str, now: int) -> _Response | None:
        row = self._responses.get((tenant, response_id))
        if row is None:
            return None
        if not base.live(row.turn.expire_time_us, now):
            self._drop_response(row)
            return None
        return row

    def _find_conversation(
        self, tenant: str, conversation_id: str, now: int
    ) -> _Conversation | None:
        conv = self._conversations.get((tenant, conversation_id))
        if conv is not None and not base.live(conv.expire_time_us, now):
            self._drop_conversation(conv)
            return None
        return conv

    def _conversation(self, tenant: str, conversation_id: str, now: int) -> _Conversation:
        conv = self._find_conversation(tenant, conversation_id, now)
        if conv is None:
            raise errors.conversation_not_found(conversation_id)
        return conv

    def _drop_response(self, row: _Response) -> None:
        del self._responses[(row.tenant, row.turn.id)]
        if row.turn.idempotency_key:
            self._keys.pop((row.tenant, row.turn.idempotency_key), None)
        items = (*row.turn.input_items, *row.turn.output_items)
        self._unindex(row.tenant, base.RESPONSE_COPY, row.turn.id, items)

    def _drop_conversation(self, conv: _Conversation) -> None:
        del self._conversations[(conv.tenant, conv.id)]
        if conv.request_id:
            self._requests.pop((conv.tenant, conv.request_id), None)
        self._unindex(conv.tenant, base.CONVERSATION_COPY, conv.id, list(conv.items.values()))

    def _index(self, tenant: str, where: int, owner: str, items: Sequence[Item]) -> None:
        for item in items:
            self._item_index.setdefault((tenant, item.id), set()).add((where, owner))

    def _unindex(self, tenant: str, where: int, owner: str, items: Sequence[Item]) -> None:
        """Forgets where deleted items were (get_items would drop the entries anyway)."""
        for item in items:
            places = self._item_index.get((tenant, item.id))
            if places is not None:
                places.discard((where, owner))
                if not places:
                    del self._item_index[(tenant, item.id)]

    def _index_turn(self, tenant: str, turn: Turn) -> None:
        if not turn.in_progress:
            self._index(tenant, base.RESPONSE_COPY, turn.id, turn.input_items)
            self._index(tenant, base.RESPONSE_COPY, turn.id, turn.output_items)

    def _append(
        self, tenant: str, conv: _Conversation, items: Sequence[Item], now: int
    ) -> tuple[Item, ...]:
        self._index(tenant, base.CONVERSATION_COPY, conv.id, items)
        return conv.append(items, now)

    # --- responses ------------------------------------------------------------------------

    async def put_turn(
        self,
        tenant: str,
        turn: Turn,
        *,
        expected_conversation_version: int | None,
        require_intact_chain: bool = False,
    ) -> PutTurnResult:
        turn = base.owned(turn)  # kept: not a view of the request
        now = base.now_us()
        digest = base.turn_digest(turn)
        existing = self._response(tenant, turn.id, now)
        if existing is not None:
            if existing.turn.in_progress:
                return self._replace(existing, turn, digest, expected_conversation_version, now)
            if existing.digest != digest:
                raise errors.response_id_conflict(turn.id)
            return PutTurnResult(existing.turn, True, existing.conversation_version)
        if turn.idempotency_key:
            first_id = self._keys.get((tenant, turn.idempotency_key))
            first = self._response(tenant, first_id, now) if first_id else None
            if first is not None:
                return PutTurnResult(first.turn, True, first.conversation_version)
        if turn.previous_response_id:
            previous = self._response(tenant, turn.previous_response_id, now)
            if previous is None:
                raise errors.previous_response_not_found(turn.previous_response_id)
            if previous.turn.in_progress:
                raise errors.previous_response_in_progress(turn.previous_response_id)
            if require_intact_chain:
                self._chain(tenant, previous, now)
        stored = base.stored_turn(turn, now, base.expire_at(now, self._retention_s))
        version = self._add_to_conversation(tenant, turn, expected_conversation_version, now)
        self._pk += 1
        self._responses[(tenant, turn.id)] = _Response(self._pk, tenant, stored, digest, version)
        self._index_turn(tenant, stored)
        if turn.idempotency_key:
            self._keys[(tenant, turn.idempotency_key)] = turn.id
        return PutTurnResult(stored, False, version)

    def _replace(
        self, row: _Response, turn: Turn, digest: bytes, expected: int | None, now: int
    ) -> PutTurnResult:
        """Replaces a running turn in place (its pk keeps its place in the chain order)."""
        stored = base.replacing_turn(row.turn, turn)
        row.conversation_version = self._add_to_conversation(row.tenant, turn, expected, now)
        row.turn = stored
        row.digest = digest
        self._index_turn(row.tenant, stored)
        if row.job is not None and not turn.in_progress:
            # A final turn finishes the running turn's job (see PutTurn).
            row.job.done = True
            self._pending.discard((row.tenant, turn.id))
        return PutTurnResult(stored, False, row.conversation_version)

    def _add_to_conversation(self, tenant: str, turn: Turn, expected: int | None, now: int) -> int:
        """Checks the turn's conversation and appends a final turn's items to it; returns the
        conversation's version after (0 without one). Raises before changing anything."""
        if not turn.conversation_id:
            return 0
        conv = self._conversation(tenant, turn.conversation_id, now)
        base.check_version(conv.id, expected, conv.version)
        if turn.in_progress:
            return conv.version
        items = [*turn.input_items, *turn.output_items]
        for item in items:
            if item.id in conv.seq_by_id:
                raise errors.item_id_conflict(conv.id, item.id)
        self._append(tenant, conv, items, now)
        self._touch(conv, now)
        return conv.version

    async def get_response(
        self,
        tenant: str,
        *,
        response_id: str = "",
        idempotency_key: str = "",
        with_items: bool = True,
    ) -> Turn:
        now = base.now_us()
        if idempotency_key:
            found = self._keys.get((tenant, idempotency_key))
            row = self._response(tenant, found, now) if found else None
            if row is None:
                raise errors.idempotency_key_not_found(idempotency_key)
            return row.turn
        row = self._response(tenant, response_id, now)
        if row is None:
            raise errors.response_not_found(response_id)
        return row.turn

    async def response_history(self, tenant: str, response_id: str, *, limit: int) -> History:
        now = base.now_us()
        row = self._response(tenant, response_id, now)
        if row is None:
            raise errors.response_not_found(response_id)
        if row.turn.in_progress:
            raise errors.response_in_progress(response_id)
        chain = self._chain(tenant, row, now)
        items = [i for r in chain for i in (*r.turn.input_items, *r.turn.output_items)]
        kept, omitted = base.cut_oldest(items, limit)
        return History(items=kept, omitted=omitted, response_ids=[r.turn.id for r in chain])

    def _chain(self, tenant: str, row: _Response, now: int) -> list[_Response]:
        """The chain ending at ``row``, oldest first; raises HISTORY_BROKEN when a link is
        gone."""
        chain = [row]
        while chain[-1].turn.previous_response_id:
            prev_id = chain[-1].turn.previous_response_id
            prev = self._response(tenant, prev_id, now)
            # A previous response stored after its follower is a re-created id, not the
            # original link: the original was deleted, so the history is broken.
            if prev is None or prev.pk >= chain[-1].pk:
                raise errors.history_broken(row.turn.id, prev_id)
            chain.append(prev)
        chain.reverse()
        return chain

    async def get_items(self, tenant: str, item_ids: Sequence[str]) -> dict[str, Item]:
        now = base.now_us()
        rows: list[tuple[str, bytes, int, int, int, int]] = []
        for item_id in item_ids:
            places = self._item_index.get((tenant, item_id))
            if not places:
                continue
            for where, owner in list(places):
                found = self._copies(tenant, item_id, where, owner, now)
                if not found:
                    places.discard((where, owner))
                rows.extend(found)
            if not places:
                del self._item_index[(tenant, item_id)]
        return base.newest_items(rows)

    def _copies(
        self, tenant: str, item_id: str, where: int, owner: str, now: int
    ) -> list[tuple[str, bytes, int, int, int, int]]:
        """The live copies of an item where the index says it was stored (rows for
        base.newest_items); none when that place is gone or no longer holds it."""
        if where == base.CONVERSATION_COPY:
            conv = self._find_conversation(tenant, owner, now)
            seq = conv.seq_by_id.get(item_id) if conv is not None else None
            if conv is None or seq is None:
                return []
            item = conv.items[seq]
            return [(item_id, bytes(item.json), item.create_time_us, seq, where, seq)]
        row = self._response(tenant, owner, now)
        if row is None:
            return []
        turn = row.turn
        if turn.in_progress:
            # Its final turn indexes its items again when it replaces it.
            return []
        return [
            (item_id, bytes(i.json), turn.create_time_us, i.sequence, where, row.pk)
            for i in (*turn.input_items, *turn.output_items)
            if i.id == item_id
        ]

    async def delete_response(self, tenant: str, response_id: str) -> None:
        row = self._response(tenant, response_id, base.now_us())
        if row is None:
            raise errors.response_not_found(response_id)
        self._drop_response(row)

    # --- conversations --------------------------------------------------------------------

    def _touch(self, conv: _Conversation, now: int) -> None:
        if self._retention_s > 0:
            conv.expire_time_us = base.expire_at(now, self._retention_s)

    async def create_conversation(
        self, tenant: str, metadata: Mapping[str, str], items: Sequence[Item], request_id: str
    ) -> CreatedConversation:
        now = base.now_us()
        digest = base.conversation_digest(metadata, items) if request_id else b""
        if request_id:
            first_id = self._requests.get((tenant, request_id))
            first = self._find_conversation(tenant, first_id, now) if first_id else None
            if first is not None:
                if first.request_digest != digest:
                    raise errors.request_id_conflict(request_id)
                # The first call's result: its items got sequence 1..n at creation.
                return CreatedConversation(
                    first.public(), base.positioned(items, first.create_time_us), replayed=True
                )
        conv = _Conversation(
            tenant=tenant,
            id=base.new_conversation_id(),
            metadata=dict(metadata),
            create_time_us=now,
            expire_time_us=base.expire_at(now, self._retention_s),
            request_id=request_id,
            request_digest=digest,
        )
        stored = self._append(tenant, conv, items, now)
        self._conversations[(tenant, conv.id)] = conv
        if request_id:
            self._requests[(tenant, request_id)] = conv.id
        return CreatedConversation(conv.public(), stored)

    async def get_conversation(self, tenant: str, conversation_id: str) -> Conversation:
        return self._conversation(tenant, conversation_id, base.now_us()).public()

    async def get_conversation_by_request(self, tenant: str, request_id: str) -> Conversation:
        first_id = self._requests.get((tenant, request_id))
        conv = self._find_conversation(tenant, first_id, base.now_us()) if first_id else None
        if conv is None:
            raise errors.request_not_found(request_id)
        return conv.public()

    async def update_conversation(
        self, tenant: str, conversation_id: str, metadata: Mapping[str, str]
    ) -> Conversation:
        conv = self._conversation(tenant, conversation_id, base.now_us())
        conv.metadata = dict(metadata)
        return conv.public()

    async def delete_conversation(self, tenant: str, conversation_id: str) -> None:
        self._drop_conversation(self._conversation(tenant, conversation_id, base.now_us()))

    async def conversation_history(
        self, tenant: str, conversation_id: str, *, limit: int
    ) -> History:
        conv = self._conversation(tenant, conversation_id, base.now_us())
        items = [conv.items[s] for s in conv.seqs]
        kept, omitted = base.cut_oldest(items, limit)
        return History(items=kept, omitted=omitted, conversation_version=conv.version)

    async def append_items(
        self,
        tenant: str,
        conversation_id: str,
        items: Sequence[Item],
        *,
        expected_version: int | None,
    ) -> AppendResult:
        now = base.now_us()
        conv = self._conversation(tenant, conversation_id, now)
        existing = {i.id: conv.items[conv.seq_by_id[i.id]] for i in items if i.id in conv.seq_by_id}
        replayed = base.classify_append(conv.id, items, existing)
        if replayed is not None:
            return AppendResult(replayed, conv.version, True)
        base.check_version(conv.id, expected_version, conv.version)
        stored = self._append(tenant, conv, items, now)
        self._touch(conv, now)
        return AppendResult(stored, conv.version, False)

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
        conv = self._conversation(tenant, conversation_id, base.now_us())
        if after_sequence is None and after_item_id:
            after_sequence = conv.seq_by_id.get(after_item_id)
            if after_sequence is None:
                raise errors.item_not_found(conv.id, after_item_id)
        if descending:
            end = (
                len(conv.seqs)
                if after_sequence is None
                else bisect.bisect_left(conv.seqs, after_sequence)
            )
            seqs = conv.seqs[max(0, end - limit - 1) : end][::-1]
        else:
            start = 0 if after_sequence is None else bisect.bisect_right(conv.seqs, after_sequence)
            seqs = conv.seqs[start : start + limit + 1]
        return ItemPage([conv.items[s] for s in seqs[:limit]], len(seqs) > limit)

    async def get_item(self, tenant: str, conversation_id: str, item_id: str) -> Item:
        conv = self._conversation(tenant, conversation_id, base.now_us())
        seq = conv.seq_by_id.get(item_id)
        if seq is None:
            raise errors.item_not_found(conv.id, item_id)
        return conv.items[seq]

    async def delete_item(self, tenant: str, conversation_id: str, item_id: str) -> Conversation:
        conv = self._conversation(tenant, conversation_id, base.now_us())
        seq = conv.seq_by_id.pop(item_id, None)
        if seq is None:
            raise errors.item_not_found(conv.id, item_id)
        self._unindex(tenant, base.CONVERSATION_COPY, conv.id, [conv.items.pop(seq)])
        conv.seqs.pop(bisect.bisect_left(conv.seqs, seq))
        return conv.public()

    # --- housekeeping ---------------------------------------------------------------------

    async def sweep(self) -> int:
        now = base.now_us()
        gone_responses = [
            r for r in self._responses.values() if not base.live(r.turn.expire_time_us, now)
        ]
        for row in gone_responses:
            self._drop_response(row)
        gone_conversations = [
            c for c in self._conversations.values() if not base.live(c.expire_time_us, now)
        ]
        for conv in gone_conversations:
            self._drop_conversation(conv)
        gone_compactions = [
            key for key, c in self._compactions.items() if not base.live(c.expire_time_us, now)
        ]
        for key in gone_compactions:
            del self._compactions[key]
        return len(gone_responses) + len(gone_conversations) + len(gone_compactions)

    # --- compaction summaries ----------------------------------------------------------------

    def _compaction(self, tenant: str, compaction_id: str, now: int) -> Compaction | None:
        found = self._compactions.get((tenant, compaction_id))
        if found is None or base.live(found.expire_time_us, now):
            return found
        del self._compactions[(tenant, compaction_id)]
        return None

    async def put_compaction(self, tenant: str, compaction: Compaction) -> PutCompactionResult:
        now = base.now_us()
        existing = self._compaction(tenant, compaction.id, now)
        result = base.stored_compaction(compaction, existing, now, self._retention_s)
        if not result.replayed:
            self._compactions[(tenant, compaction.id)] = result.compaction
        return result

    async def get_compaction(self, tenant: str, compaction_id: str) -> Compaction:
        found = self._compaction(tenant, compaction_id, base.now_us())
        if found is None:
            raise errors.compaction_not_found(compaction_id)
        return found

    # --- background jobs ------------------------------------------------------------------

    def _state(self, row: _Response | None) -> JobState | None:
        if row is None:
            return None
        job = row.job
        if job is None:
            return JobState(row.pk, row.turn.in_progress, False)
        return JobState(
            row.pk,
            row.turn.in_progress,
            True,
            job.lease_token,
            job.done,
            job.cancelled,
            job.finished_token,
            job.owner,
        )

    def _job(self, row: _Response) -> Job:
        job = row.job
        assert job is not None
        return Job(
            tenant=row.tenant,
            response_id=row.turn.id,
            spec=job.spec,
            lease_token=job.lease_token,
            owner=job.owner,
            lease_expire_us=job.lease_expire_us,
            last_sequence=len(row.events) - 1,
            create_time_us=job.create_time_us,
        )

    def _pending_rows(self, now: int) -> list[_Response]:
        """The live running responses whose job is not finished (forgetting the others)."""
        rows = []
        for key in list(self._pending):
            row = self._response(*key, now)
            if row is None or row.job is None or row.job.done or not row.turn.in_progress:
                self._pending.discard(key)
            else:
                rows.append(row)
        return rows

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
        now = base.now_us()
        row = self._response(tenant, turn.id, now)
        if row is not None and row.job is not None:
            held = bool(owner) and row.job.owner == owner and not row.job.done
            return EnqueueResult(
                PutTurnResult(row.turn, True, row.conversation_version),
                self._job(row) if held else None,
            )
        pending = self._pending_rows(now)
        base.check_pending(
            sum(r.tenant == tenant for r in pending),
            len(pending),
            max_pending_per_tenant,
            max_pending_total,
        )
        # put_turn never awaits, so this method stays atomic on the event loop.
        result = await self.put_turn(
            tenant,
            turn,
            expected_conversation_version=None,
            require_intact_chain=require_intact_chain,
        )
        if result.replayed:
            return EnqueueResult(result, None)
        row = self._responses[(tenant, turn.id)]
        row.job = _Job(spec=spec, create_time_us=now)
        if owner:
            row.job.owner, row.job.lease_token = owner, 1
            row.job.lease_expire_us = now + lease_us
        self._pending.add((tenant, turn.id))
        return EnqueueResult(result, self._job(row) if owner else None)

    async def claim_job(
        self, tenant: str, owner: str, lease_us: int, request_id: str
    ) -> Job | None:
        now = base.now_us()
        first = self._claims.get(request_id)
        if first is not None:
            key, token = first
            row = self._response(*key, now)
            if row is not None and row.job is not None and row.job.lease_token == token:
                if not row.job.done:
                    return self._job(row)
        claimable = [
            r
            for r in self._pending_rows(now)
            if r.job is not None
            and r.job.lease_expire_us <= now
            and (not tenant or r.tenant == tenant)
        ]
        if not claimable:
            return None
        row = min(claimable, key=lambda r: (r.job.lease_expire_us if r.job else 0, r.pk))
        assert row.job is not None
        row.job.owner = owner
        row.job.lease_token += 1
        row.job.lease_expire_us = now + lease_us
        self._claims[request_id] = ((row.tenant, row.turn.id), row.job.lease_token)
        return self._job(row)

    async def renew_lease(
        self, tenant: str, response_id: str, lease_token: int, lease_us: int
    ) -> Renewal:
        now = base.now_us()
        row = self._response(tenant, response_id, now)
        state = self._state(row)
        if state is not None and state.cancelled:
            return Renewal(0, True)
        base.check_holder(state, response_id, lease_token)
        assert row is not None and row.job is not None
        row.job.lease_expire_us = now + lease_us
        return Renewal(row.job.lease_expire_us, False)

    def _fresh_events(self, row: _Response, events: Sequence[Event]) -> Sequence[Event]:
        last = len(row.events) - 1
        stored = {e.sequence: row.events[e.sequence] for e in events if 0 <= e.sequence <= last}
        return base.new_events(row.turn.id, last, stored, events)

    async def append_events(
        self, tenant: str, response_id: str, lease_token: int, events: Sequence[Event]
    ) -> int:
        row = self._response(tenant, response_id, base.now_us())
        base.check_holder(self._state(row), response_id, lease_token)
        assert row is not None
        row.events.extend(e.json for e in self._fresh_events(row, events))
        return len(row.events) - 1

    async def finish_job(
        self, tenant: str, turn: Turn, lease_token: int, events: Sequence[Event]
    ) -> PutTurnResult:
        row = self._response(tenant, turn.id, base.now_us())
        state = self._state(row)
        if row is not None and state is not None and state.done and not state.cancelled:
            if state.finished_token == lease_token:
                return PutTurnResult(row.turn, True, row.conversation_version)
        base.check_holder(state, turn.id, lease_token)
        assert row is not None and row.job is not None
        log = [*row.events, *(e.json for e in self._fresh_events(row, events))]
        # put_turn checks everything before it changes anything: the log grows only after.
        final = replace(turn, stream_events_json=base.joined_log(log))
        result = await self._put_final(tenant, row, final)
        row.events = log
        row.job.done, row.job.finished_token = True, lease_token
        self._pending.discard((tenant, turn.id))
        self._forget_claims((tenant, turn.id))
        return result

    async def _put_final(self, tenant: str, row: _Response, final: Turn) -> PutTurnResult:
        """The final turn of a background job, as PutTurn replaces a running turn; when its
        conversation was deleted meanwhile, stored without appending its items anywhere."""
        conversation = final.conversation_id
        live = (
            self._find_conversation(tenant, conversation, base.now_us()) if conversation else None
        )
        if live is not None or not conversation or not row.turn.in_progress:
            return await self.put_turn(tenant, final, expected_conversation_version=None)
        stored = base.replacing_turn(row.turn, final)
        row.turn, row.digest, row.conversation_version = stored, base.turn_digest(final), 0
        self._index_turn(tenant, stored)
        return PutTurnResult(stored, False, 0)

    async def cancel_job(self, tenant: str, turn: Turn, cancel_event: bytes) -> CancelResult:
        row = self._response(tenant, turn.id, base.now_us())
        if row is None:
            raise errors.response_not_found(turn.id)
        if not row.turn.in_progress:
            return CancelResult(row.turn, False)
        if row.job is None:
            raise errors.not_background(turn.id)
        log = list(row.events)
        if cancel_event:
            log.append(base.stamped(cancel_event, len(log)))
        final = replace(turn, stream_events_json=base.joined_log(log))
        result = await self._put_final(tenant, row, final)
        row.events = log
        row.job.done = row.job.cancelled = True
        self._pending.discard((tenant, turn.id))
        self._forget_claims((tenant, turn.id))
        return CancelResult(result.turn, True)

    def _forget_claims(self, key: tuple[str, str]) -> None:
        for request_id in [r for r, (k, _) in self._claims.items() if k == key]:
            del self._claims[request_id]

    async def read_events(
        self, tenant: str, response_id: str, *, after: int, limit: int
    ) -> EventPage:
        row = self._response(tenant, response_id, base.now_us())
        if row is None:
            raise errors.response_not_found(response_id)
        if row.turn.in_progress and row.job is None:
            raise errors.not_background(response_id)
        first = after + 1
        last = min(len(row.events), first + limit)
        events = [Event(seq, row.events[seq]) for seq in range(first, last)]
        return EventPage(events, not row.turn.in_progress)

    async def close(self) -> None:
        self._responses.clear()
        self._conversations.clear()
        self._pending.clear()
        self._claims.clear()
