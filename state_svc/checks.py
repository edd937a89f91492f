"""What a state request must be before anything is read or written, and the incoming messages
as the backend's dataclasses: every string field's length and bytes (:func:`check_strings`, run
on every request before its handler), the required fields, JSON that must be an object, unique
item ids, and a turn, its items and events converted once checked. A failure is
INVALID_ARGUMENT naming the field (``state_svc.errors.invalid``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from google.protobuf import duration_pb2

from respgw.state.v1 import resources_pb2
from state_svc import errors, long_json, wire
from state_svc.backends import base

MAX_METADATA_PAIRS = 16

_invalid = errors.invalid

# --- every request's strings, before any handler -------------------------------------------

MAX_ID_CHARS = 512


def check_strings(request: Any, prefix: str = "") -> None:
    """Refuses a request whose tenant, ids, keys or owners (every string field, and those of its
    messages and items) are over MAX_ID_CHARS characters or hold a NUL: INVALID_ARGUMENT naming
    the field, before anything is read or written (PostgreSQL cannot store a NUL, and no stored
    id is that long); metadata keys and values likewise. JSON (bytes) is checked elsewhere."""
    for fd, value in request.ListFields():
        kind = _KINDS.get(fd)
        if kind is None:
            kind = _KINDS[fd] = _kind(fd)
        if kind == _STRING:
            if len(value) > MAX_ID_CHARS or "\x00" in value:
                check_string(f"{prefix}{fd.name}", value)
        elif kind == _STRINGS:
            for n, element in enumerate(value):
                check_string(f"{prefix}{fd.name}[{n}]", element)
        elif kind == _MAP:
            for key, item in value.items():
                check_string(f"{prefix}{fd.name}[{key[:32]}]", key)
                if isinstance(item, str):
                    check_string(f"{prefix}{fd.name}[{key[:32]}]", item)
        elif kind == _MESSAGES:
            for n, element in enumerate(value):
                check_strings(element, f"{prefix}{fd.name}[{n}].")
        elif kind == _MESSAGE:
            check_strings(value, f"{prefix}{fd.name}.")


# What check_strings does with a field, by its descriptor (worked out once per field: reading a
# descriptor's options for every field of every request was most of its time).
_SKIP, _STRING, _STRINGS, _MAP, _MESSAGES, _MESSAGE = range(6)
_KINDS: dict[Any, int] = {}


def _kind(fd: Any) -> int:
    if fd.type == fd.TYPE_STRING:
        return _STRINGS if fd.is_repeated else _STRING
    if fd.type != fd.TYPE_MESSAGE:
        return _SKIP
    if fd.message_type.GetOptions().map_entry:
        return _MAP
    if fd.is_repeated:
        return _MESSAGES
    return _MESSAGE if fd.message_type.full_name.startswith("respgw.") else _SKIP


def check_string(name: str, value: str) -> None:
    if len(value) > MAX_ID_CHARS or "\x00" in value:
        raise _invalid(name, f"{name} must be at most {MAX_ID_CHARS} characters, without NUL")


# --- validation ---------------------------------------------------------------------------


def tenant(tenant: str) -> str:
    if not tenant:
        raise errors.tenant_required()
    return tenant


def require(value: str | bytes | memoryview, field: str) -> None:
    if not value:
        raise _invalid(field, f"{field} is required")


def bytes_field(
    r: resources_pb2.StoredResponse, name: str, large: Mapping[str, memoryview] | None
) -> bytes | memoryview:
    """A bytes field of a stored response: its view in ``large`` when the request was split
    there (see wire), else the field (a copy)."""
    if large is not None and name in large:
        return large[name]
    value: bytes = getattr(r, name)
    return value


def is_json_object(data: bytes) -> bool:
    try:
        return isinstance(orjson.loads(data), dict)
    except orjson.JSONDecodeError:
        return False


def json_object(data: bytes | memoryview) -> dict[str, Any] | None:
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def response_object(
    data: bytes | memoryview,
) -> tuple[dict[str, Any] | None, long_json.Skeleton | None]:
    """A turn's response JSON as an object (None when it is none), and its skeleton when it is
    large and has long strings (see state_svc.long_json: the object is then the skeleton's)."""
    if isinstance(data, memoryview):
        try:
            shape = long_json.skeleton(data)
        except orjson.JSONDecodeError:
            return None, None
        if shape is not None:
            return shape.value, shape
    return json_object(data), None


def output_of(
    response: dict[str, Any],
    seen: set[str] | None,
    source: bytes | memoryview,
    shape: long_json.Skeleton | None = None,
) -> tuple[base.Item, ...]:
    """The output items of a turn written with response_json_with_output_items: those of its
    response's "output" array, each re-encoded (see the proto). A large item whose encoding is
    in the request received as it is (the router encodes both alike) is a view of it there (see
    state_svc.wire), not a copy held while the turn is written."""
    field = "response.response_json_with_output_items"
    output = response.get("output")
    if not isinstance(output, list):
        raise _invalid(field, 'response_json has no "output" array to take the output items from')
    out = []
    for n, item in enumerate(output):
        item_id = item.get("id") if isinstance(item, dict) else None
        if not isinstance(item_id, str) or not item_id:
            raise _invalid(field, f'output[{n}] of response_json is not an object with an "id"')
        check_string(f"response_json.output[{n}].id", item_id)
        if seen is not None:
            if item_id in seen:
                raise _invalid(field, f"item id {item_id} appears twice")
            seen.add(item_id)
        if shape is not None:
            out.append(base.Item(id=item_id, json=long_json.encoded_item(shape, item)))
            continue
        out.append(base.Item(id=item_id, json=_shared(orjson.dumps(item), source)))
    return tuple(out)


def _shared(data: bytes, source: bytes | memoryview) -> bytes | memoryview:
    """``data``, or the same bytes in ``source``'s request (a view) when it is large."""
    if len(data) < wire.LARGE_REQUEST_BYTES or not isinstance(source, memoryview):
        return data
    raw = source.obj
    at = raw.find(data) if isinstance(raw, (bytes, bytearray)) else -1
    return data if at < 0 else memoryview(raw)[at : at + len(data)]


def items(
    items: Sequence[resources_pb2.Item], field: str, seen: set[str] | None
) -> tuple[base.Item, ...]:
    """Checks items (id, JSON object, and unique ids when ``seen`` is given) and converts them;
    server-set fields are ignored."""
    out = []
    for n, item in enumerate(items):
        item_id, data = item.id, item.json  # each read is a copy: read once
        require(item_id, f"{field}[{n}].id")
        require(data, f"{field}[{n}].json")
        if not is_json_object(data):
            raise _invalid(f"{field}[{n}].json", "item JSON must be a JSON object")
        if seen is not None:
            if item_id in seen:
                raise _invalid(f"{field}[{n}].id", f"item id {item_id} appears twice")
            seen.add(item_id)
        out.append(base.Item(id=item_id, json=data))
    return tuple(out)


def metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    if len(metadata) > MAX_METADATA_PAIRS:
        raise _invalid("metadata", f"at most {MAX_METADATA_PAIRS} metadata pairs are allowed")
    return dict(metadata)


def turn(r: resources_pb2.StoredResponse) -> base.Turn:
    """A turn sent to the background RPCs, checked as PutTurn checks its turn."""
    require(r.id, "response.id")
    if r.response_json_with_output_items:
        raise _invalid(
            "response.response_json_with_output_items",
            "response_json_with_output_items is for PutTurn",
        )
    require(r.response_json, "response.response_json")
    if not is_json_object(r.response_json):
        raise _invalid("response.response_json", "response_json must be a JSON object")
    if r.previous_response_id and r.conversation_id:
        raise _invalid(
            "response.conversation_id",
            "a turn cannot have both previous_response_id and conversation_id",
        )
    seen: set[str] | None = set() if r.conversation_id else None
    return base.Turn(
        id=r.id,
        response_json=r.response_json,
        previous_response_id=r.previous_response_id,
        conversation_id=r.conversation_id,
        input_items=items(r.input_items, "response.input_items", seen),
        output_items=items(r.output_items, "response.output_items", seen),
        idempotency_key=r.idempotency_key,
        stream_events_json=r.stream_events_json,
        in_progress=r.in_progress,
    )


# The largest compaction summary PutCompaction stores (its contract).
MAX_SUMMARY_BYTES = 1 << 20


def compaction(c: resources_pb2.Compaction) -> base.Compaction:
    """A PutCompaction record, checked: an id and a summary of at most MAX_SUMMARY_BYTES."""
    require(c.id, "compaction.id")
    summary = c.summary
    require(summary, "compaction.summary")
    if len(summary) > MAX_SUMMARY_BYTES:
        raise _invalid(
            "compaction.summary", f"compaction.summary must be at most {MAX_SUMMARY_BYTES} bytes"
        )
    return base.Compaction(id=c.id, summary=summary)


def positive_us(duration: duration_pb2.Duration, field: str) -> int:
    micros = duration.seconds * 1_000_000 + duration.nanos // 1000
    if micros <= 0:
        raise _invalid(field, f"{field} must be positive")
    return micros


def lease_token(token: int) -> None:
    if token < 1:
        raise _invalid("lease_token", "lease_token must be 1 or more")


def events(events: Sequence[resources_pb2.ResponseEvent]) -> list[base.Event]:
    """Checks an append's events: JSON objects with consecutive sequence numbers."""
    out: list[base.Event] = []
    for n, event in enumerate(events):
        if event.sequence_number < 0 or (n and event.sequence_number != out[-1].sequence + 1):
            raise _invalid(
                f"events[{n}].sequence_number", "events must have consecutive sequence numbers"
            )
        if not is_json_object(event.json):
            raise _invalid(f"events[{n}].json", "an event must be a JSON object")
        out.append(base.Event(event.sequence_number, event.json))
    return out
