"""Sealed content: the opaque ``encrypted_content`` the gateway mints for clients to hand back.

Reasoning items (for ``store: false`` clients such as Codex) and compaction items carry text the
gateway needs again on a later turn: it goes to the client sealed, and comes back in the
client's input. Sealing is AES-256-GCM (``cryptography``) with the tenant and the purpose as
associated data, so content sealed for one tenant never opens for another, and a sealed
reasoning text never opens as a compaction summary.

The sealed form is ``rgw1.<key id>.<base64url(nonce || ciphertext || tag)>``, followed by
``.<ref>`` when the text is also kept in the state service under that id (a compaction item's
summary, router_svc.compaction): the ref is then bound into the associated data too, and names
the record to restore the text from where the content cannot be opened because its key is not
this router's (:meth:`Sealer.knows`). Keys come from ``--seal-keys`` (``ID=BASE64`` pairs of
32-byte keys): the first seals, every one opens, so a key is rotated by putting a new one first
and dropping the old one once nothing sealed with it is still in use. Without keys the router
makes a random one, under a random id, when it starts (and says so once, at WARNING): sealed
reasoning it minted then does not open after a restart or on another replica (compaction items
still do, from the state service).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import secrets
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from router_svc import errors

log = logging.getLogger(__name__)

PREFIX = "rgw1."
KEY_BYTES = 32
_NONCE_BYTES = 12
_KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
# A ref names a state record (a compaction item id): the characters of the gateway's ids.
_REF = re.compile(r"^[A-Za-z0-9_-]{1,128}$")

# What the content is for (part of the associated data): one purpose never opens as another.
REASONING = "reasoning"
COMPACTION = "compaction"


def parse_keys(spec: str) -> list[tuple[str, bytes]]:
    """``--seal-keys``: comma-separated ``ID=BASE64`` pairs, each key 32 bytes (standard or
    URL-safe base64). Raises ValueError naming what is wrong (never the key itself)."""
    keys: list[tuple[str, bytes]] = []
    for raw in spec.split(","):
        entry = raw.strip()
        if not entry:
            continue
        key_id, sep, encoded = entry.partition("=")
        key_id = key_id.strip()
        if not sep or not _KEY_ID.match(key_id):
            raise ValueError(
                "--seal-keys takes comma-separated ID=BASE64 pairs, the ID made of letters, "
                "digits, '-' and '_' (at most 32)"
            )
        encoded = encoded.strip()
        try:
            key = base64.urlsafe_b64decode(
                encoded.replace("+", "-").replace("/", "_") + "=" * (-len(encoded) % 4)
            )
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"--seal-keys: key {key_id!r} is not base64") from exc
        if len(key) != KEY_BYTES:
            raise ValueError(f"--seal-keys: key {key_id!r} must be {KEY_BYTES} bytes")
        if any(key_id == known for known, _ in keys):
            raise ValueError(f"--seal-keys: key id {key_id!r} is given twice")
        keys.append((key_id, key))
    return keys


class Sealer:
    """Seals and opens text for one tenant and purpose; the first key seals, all of them open."""

    def __init__(self, keys: list[tuple[str, bytes]]) -> None:
        if not keys:
            raise ValueError("a Sealer needs at least one key")
        self._seal_id = keys[0][0]
        self._ciphers = {key_id: AESGCM(key) for key_id, key in keys}

    @classmethod
    def from_setting(cls, spec: str) -> Sealer:
        """The sealer of ``--seal-keys``; a random key (with one WARNING) when it is empty."""
        keys = parse_keys(spec)
        if not keys:
            log.warning(
                "no --seal-keys given: sealing with a random key made at start, so sealed "
                "reasoning content will not open after a restart or on another replica "
                "(compaction items are restored from the state service)"
            )
            # A random id too: another router's random key has another id, so its content is
            # known not to be this router's (Sealer.knows) rather than tampered with.
            keys = [(f"auto-{secrets.token_hex(8)}", AESGCM.generate_key(bit_length=KEY_BYTES * 8))]
        return cls(keys)

    def seal(self, text: str, *, tenant: str, purpose: str, ref: str = "") -> str:
        """``text`` sealed for the tenant and purpose; with ``ref`` (the id of a state record
        that keeps the text too), the ref is appended in the clear and bound to the seal."""
        if ref and not _REF.match(ref):
            raise ValueError(f"a seal's ref is letters, digits, '-' and '_', not {ref!r}")
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._ciphers[self._seal_id].encrypt(
            nonce, text.encode(), _associated(tenant, purpose, ref)
        )
        body = base64.urlsafe_b64encode(nonce + sealed).rstrip(b"=").decode()
        content = f"{PREFIX}{self._seal_id}.{body}"
        return f"{content}.{ref}" if ref else content

    def knows(self, envelope: Envelope) -> bool:
        """Whether this router has the key ``envelope`` names: if not, the content may be
        another router's, and only its ref can restore it."""
        return envelope.key_id in self._ciphers

    def open(self, content: str, *, tenant: str, purpose: str) -> str | None:
        """The text ``content`` seals for this tenant and purpose; None when it is not the
        gateway's, was sealed for another tenant or purpose, was changed, or its key is gone."""
        sealed = envelope(content)
        cipher = None if sealed is None else self._ciphers.get(sealed.key_id)
        if sealed is None or cipher is None:
            return None
        try:
            raw = base64.urlsafe_b64decode(sealed.body + "=" * (-len(sealed.body) % 4))
        except (binascii.Error, ValueError):
            return None
        if len(raw) <= _NONCE_BYTES:
            return None
        try:
            plain = cipher.decrypt(
                raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], _associated(tenant, purpose, sealed.ref)
            )
        except InvalidTag:
            return None
        try:
            return plain.decode()
        except UnicodeDecodeError:
            return None

    def open_or_refuse(self, content: str, *, tenant: str, purpose: str, param: str) -> str:
        """:meth:`open`, or a 400 naming the item's ``encrypted_content``."""
        text = self.open(content, tenant=tenant, purpose=purpose)
        if text is None:
            raise invalid_encrypted_content(param)
        return text


@dataclass(frozen=True, slots=True)
class Envelope:
    """The parts of a sealed content, read without any key."""

    key_id: str
    body: str
    # The id of the state record that keeps the text too; empty when there is none.
    ref: str = ""


def envelope(content: str) -> Envelope | None:
    """The parts of ``content`` when it has the sealed form, else None."""
    if not content.startswith(PREFIX):
        return None
    key_id, sep, rest = content[len(PREFIX) :].partition(".")
    if not sep or not key_id:
        return None
    body, _, ref = rest.partition(".")
    if ref and not _REF.match(ref):
        return None
    return Envelope(key_id, body, ref)


def is_sealed(content: object) -> bool:
    """Whether ``content`` is in the gateway's sealed form (not yet whether it opens)."""
    return isinstance(content, str) and content.startswith(PREFIX)


def invalid_encrypted_content(param: str) -> errors.InvalidRequest:
    return errors.InvalidRequest(
        f"The encrypted content of '{param}' could not be verified: it was not made by this "
        "server for this project, was changed, or was sealed with a key this server no longer "
        "has.",
        param=param,
        code="invalid_encrypted_content",
    )


def _associated(tenant: str, purpose: str, ref: str = "") -> bytes:
    data = b"respgw-seal\x00" + purpose.encode() + b"\x00" + tenant.encode()
    # Content without a ref keeps the associated data it was sealed with before refs existed.
    return data + b"\x00" + ref.encode() if ref else data
