"""Object ids in OpenAI's style: a type prefix, an underscore and 48 random hex characters."""

from __future__ import annotations

import os

# Random bytes are read from the kernel in blocks rather than one system call per id (ids are
# minted several times per request); a forked child starts with a fresh block of its own.
_BLOCK = 24 * 512
_pool = b""
_pos = 0


def _reset() -> None:
    global _pool, _pos
    _pool, _pos = b"", 0


os.register_at_fork(after_in_child=_reset)


def new_id(prefix: str) -> str:
    """A fresh unguessable id, e.g. ``new_id("resp")`` -> ``"resp_3f1c..."``."""
    return f"{prefix}_{random_hex(24)}"


def random_hex(size: int) -> str:
    """``size`` random bytes (at most 24) in hex, from the same blocks as the ids: what
    ``secrets.token_hex(size)`` gives, without a system call each time."""
    global _pool, _pos
    if _pos + size > len(_pool):
        _pool, _pos = os.urandom(_BLOCK), 0
    start = _pos
    _pos += size
    return _pool[start:_pos].hex()
