"""A large PutTurn request read without copying its large fields (issue 13).

gRPC keeps the bytes of a unary request for as long as the call runs; parsing them into a message
copies every field once more, and reading a bytes field of the message copies it again. A request
of :data:`LARGE_REQUEST_BYTES` or more (a turn with a long answer) is therefore split here: its
response JSON and event log (``StoredResponse.response_json``,
``response_json_with_output_items`` and ``stream_events_json``) are taken as views of the
received bytes, and only the rest is parsed (:class:`LargePutTurn`). A smaller request is parsed
as before. A message of PutTurnChunked that is one piece is likewise taken as a view of the
bytes received (:class:`Piece`, :func:`put_turn_chunk`). Protobuf's rules hold: a field that
occurs more than once (the router sends the large fields as a second occurrence of
``response``) is the last one, and bytes that are not a valid message are left to the parser,
which refuses them as it always did.
"""

from __future__ import annotations

from dataclasses import dataclass

from respgw.state.v1 import resources_pb2, state_service_pb2

# A PutTurn request this large (in bytes, as received) is split by :func:`put_turn_request`.
LARGE_REQUEST_BYTES = 256 * 1024

_STORED = resources_pb2.StoredResponse.DESCRIPTOR.fields_by_name
_RESPONSE = state_service_pb2.PutTurnRequest.DESCRIPTOR.fields_by_name["response"].number
# The fields of StoredResponse taken as views, by number.
_TAKEN = {
    _STORED[name].number: name
    for name in ("response_json", "response_json_with_output_items", "stream_events_json")
}
_LEN = 2  # the wire type of a length-delimited field
# The fields of StoredResponse that PutTurnChunked sends in pieces (PutTurnChunkedRequest's).
CHUNKED_FIELDS = ("response_json", "response_json_with_output_items", "stream_events_json")


@dataclass(frozen=True)
class LargePutTurn:
    """A PutTurn request whose large fields are views of the bytes received (``large``, by field
    name of StoredResponse: those the request set); ``request`` is the rest of it (those fields
    empty)."""

    request: state_service_pb2.PutTurnRequest
    large: dict[str, memoryview]


@dataclass(frozen=True)
class Piece:
    """A message of PutTurnChunked that is one piece (``name``: the field of
    PutTurnChunkedRequest it sets, one of CHUNKED_FIELDS), its bytes a view of the message
    received (:func:`put_turn_chunk`)."""

    name: str
    data: memoryview


class _Malformed(Exception):
    pass


_CHUNK = state_service_pb2.PutTurnChunkedRequest.DESCRIPTOR.fields_by_name
# The piece fields of PutTurnChunkedRequest, by number.
_PIECES = {_CHUNK[name].number: name for name in CHUNKED_FIELDS}


def put_turn_chunk(raw: bytes) -> state_service_pb2.PutTurnChunkedRequest | Piece:
    """The request deserializer of PutTurnChunked: a message that is one piece field and nothing
    else (as every piece is sent) is a :class:`Piece`, a view of ``raw``: parsed, its bytes
    would be copied into the message and again when read from it, twice a piece's size for
    each piece. Any other message (the head, or anything else) is parsed as before, so that
    protobuf's rules decide it."""
    try:
        number, wire, pos = _key(raw, 0)
        if wire == _LEN and number in _PIECES:
            length, pos = _varint(raw, pos)
            if pos + length == len(raw):
                return Piece(_PIECES[number], memoryview(raw)[pos:])
    except _Malformed:
        pass
    return state_service_pb2.PutTurnChunkedRequest.FromString(raw)


def put_turn_request(raw: bytes) -> state_service_pb2.PutTurnRequest | LargePutTurn:
    """The request deserializer of PutTurn (see the module docstring)."""
    if len(raw) < LARGE_REQUEST_BYTES:
        return state_service_pb2.PutTurnRequest.FromString(raw)
    try:
        rest, large = _split(raw)
    except _Malformed:
        return state_service_pb2.PutTurnRequest.FromString(raw)  # refuses it as it always did
    return LargePutTurn(state_service_pb2.PutTurnRequest.FromString(rest), large)


def _split(raw: bytes) -> tuple[bytes, dict[str, memoryview]]:
    view = memoryview(raw)
    large: dict[str, memoryview] = {}
    rest = bytearray()
    pos = 0
    while pos < len(raw):
        start = pos
        number, wire, pos = _key(raw, pos)
        end = _skip(raw, pos, wire)
        if number == _RESPONSE and wire == _LEN:
            _, body = _varint(raw, pos)
            inner = _split_response(raw, view, body, end, large)
            rest += _varint_bytes(_RESPONSE << 3 | _LEN)
            rest += _varint_bytes(len(inner))
            rest += inner
        else:
            rest += view[start:end]
        pos = end
    return bytes(rest), large


def _split_response(
    raw: bytes, view: memoryview, pos: int, end: int, large: dict[str, memoryview]
) -> bytearray:
    """The fields of one occurrence of StoredResponse (``raw[pos:end]``) but those taken into
    ``large`` (a later occurrence replaces an earlier one)."""
    rest = bytearray()
    while pos < end:
        start = pos
        number, wire, pos = _key(raw, pos)
        field_end = _skip(raw, pos, wire)
        if field_end > end:
            raise _Malformed
        name = _TAKEN.get(number)
        if name is not None and wire == _LEN:
            _, value = _varint(raw, pos)
            large[name] = view[value:field_end]
        else:
            rest += view[start:field_end]
        pos = field_end
    return rest


def _key(raw: bytes, pos: int) -> tuple[int, int, int]:
    key, pos = _varint(raw, pos)
    if key >> 3 == 0:
        raise _Malformed
    return key >> 3, key & 7, pos


def _skip(raw: bytes, pos: int, wire: int) -> int:
    """Where the value of a field of wire type ``wire`` starting at ``pos`` ends."""
    if wire == 0:
        end = _varint(raw, pos)[1]
    elif wire == 1:
        end = pos + 8
    elif wire == _LEN:
        length, pos = _varint(raw, pos)
        end = pos + length
    elif wire == 5:
        end = pos + 4
    else:  # groups: not in these messages
        raise _Malformed
    if end > len(raw):
        raise _Malformed
    return end


def _varint(raw: bytes, pos: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if pos >= len(raw) or shift > 63:
            raise _Malformed
        byte = raw[pos]
        pos += 1
        n |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return n, pos
        shift += 7


def _varint_bytes(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(0x80 | (n & 0x7F))
        n >>= 7
    out.append(n)
    return bytes(out)
