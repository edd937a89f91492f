"""Page tokens of the conversation item listing: opaque to callers, checked on return (a token
is valid only for the conversation and order it was issued for)."""

from __future__ import annotations

import base64
import hashlib

import orjson

from state_svc import errors

# --- page tokens --------------------------------------------------------------------------

# Not a secret: the check value only tells a token this service issued from a mangled or
# hand-made one. Knowing a sequence number gives a caller nothing it could not list anyway.
_TOKEN_KEY = b"respgw.state.v1.page-token"


def encode_page_token(conversation_id: str, order: int, sequence: int) -> str:
    payload = orjson.dumps([1, conversation_id, order, sequence])
    check = hashlib.blake2b(payload, key=_TOKEN_KEY, digest_size=8).digest()
    return base64.urlsafe_b64encode(check + payload).rstrip(b"=").decode()


def decode_page_token(token: str, conversation_id: str, order: int) -> int:
    """The last sequence of the previous page, or INVALID_ARGUMENT when the token was not
    issued for this conversation and order."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        check, payload = raw[:8], raw[8:]
        if hashlib.blake2b(payload, key=_TOKEN_KEY, digest_size=8).digest() != check:
            raise ValueError("check value")
        version, conv, token_order, sequence = orjson.loads(payload)
    except (ValueError, TypeError) as exc:
        raise errors.invalid("page_token", "page_token is not a token this service issued") from exc
    if version != 1 or conv != conversation_id or token_order != order:
        raise errors.invalid("page_token", "page_token was issued for another listing")
    if not isinstance(sequence, int) or sequence < 0:
        raise errors.invalid("page_token", "page_token is not a token this service issued")
    return sequence
