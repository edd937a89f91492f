"""Object ids in OpenAI's style: a type prefix, an underscore and 48 random hex characters."""

from __future__ import annotations

import secrets


def new_id(prefix: str) -> str:
    """A fresh unguessable id, e.g. ``new_id("resp")`` -> ``"resp_3f1c..."``."""
    return f"{prefix}_{secrets.token_hex(24)}"
