"""The state service's outgoing messages: stored turns, items, conversations, compaction
summaries and background jobs as API messages, and a failed Exchange call's status."""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from gateway.grpcerrors import ServiceError
from respgw.state.v1 import resources_pb2, state_service_pb2
from state_svc.backends import base

# --- conversions --------------------------------------------------------------------------


def add_items(
    target: RepeatedCompositeFieldContainer[resources_pb2.Item], items: Iterable[base.Item]
) -> None:
    """Appends ``items`` to a repeated field in place (half the cost of building each Item
    message and copying it in: this is most of GetHistory's CPU time)."""
    add = target.add
    for item in items:
        # Bytes, but for a turn being written (see base.Item; answered owned) and a long item
        # read back in pieces (PostgreSQL's GetResponse): a view, copied here.
        data = item.json
        msg = add(
            id=item.id,
            sequence=item.sequence,
            json=data if type(data) is bytes else bytes(data),
        )
        msg.create_time.FromMicroseconds(item.create_time_us)


def item_pb(item: base.Item) -> resources_pb2.Item:
    msg = resources_pb2.Item(id=item.id, sequence=item.sequence, json=bytes(item.json))
    msg.create_time.FromMicroseconds(item.create_time_us)
    return msg


def turn_pb(turn: base.Turn) -> resources_pb2.StoredResponse:
    msg = resources_pb2.StoredResponse(
        id=turn.id,
        previous_response_id=turn.previous_response_id,
        conversation_id=turn.conversation_id,
        response_json=bytes(turn.response_json),  # no copy of bytes
        idempotency_key=turn.idempotency_key,
        stream_events_json=bytes(turn.stream_events_json),
        in_progress=turn.in_progress,
    )
    add_items(msg.input_items, turn.input_items)
    add_items(msg.output_items, turn.output_items)
    msg.create_time.FromMicroseconds(turn.create_time_us)
    if turn.expire_time_us is not None:
        msg.expire_time.FromMicroseconds(turn.expire_time_us)
    return msg


def turn_header_pb(turn: base.Turn) -> resources_pb2.StoredResponse:
    """Only the server-set fields of a stored turn (PutTurnRequest.omit_stored_content)."""
    msg = resources_pb2.StoredResponse(id=turn.id)
    msg.create_time.FromMicroseconds(turn.create_time_us)
    if turn.expire_time_us is not None:
        msg.expire_time.FromMicroseconds(turn.expire_time_us)
    return msg


def conversation_pb(conversation: base.Conversation) -> resources_pb2.Conversation:
    msg = resources_pb2.Conversation(
        id=conversation.id, metadata=dict(conversation.metadata), version=conversation.version
    )
    msg.create_time.FromMicroseconds(conversation.create_time_us)
    if conversation.expire_time_us is not None:
        msg.expire_time.FromMicroseconds(conversation.expire_time_us)
    return msg


def compaction_pb(compaction: base.Compaction) -> resources_pb2.Compaction:
    msg = resources_pb2.Compaction(id=compaction.id, summary=compaction.summary)
    msg.create_time.FromMicroseconds(compaction.create_time_us)
    if compaction.expire_time_us is not None:
        msg.expire_time.FromMicroseconds(compaction.expire_time_us)
    return msg


def job_pb(job: base.Job) -> resources_pb2.BackgroundJob:
    msg = resources_pb2.BackgroundJob(
        tenant=job.tenant,
        response_id=job.response_id,
        spec=job.spec,
        lease_token=job.lease_token,
        owner=job.owner,
        last_sequence_number=job.last_sequence,
    )
    msg.lease_expire_time.FromMicroseconds(job.lease_expire_us)
    msg.create_time.FromMicroseconds(job.create_time_us)
    return msg


def set_status(status: state_service_pb2.CallStatus, error: ServiceError) -> None:
    status.code = error.code.value[0]
    status.message = error.message
    status.reason = error.reason
    status.domain = error.domain
    status.metadata.update(error.metadata)
