"""The SSE encoding of events (router_svc.events): a long answer's events sent in slices are
byte for byte the events encoded whole."""

from __future__ import annotations

import random
import secrets
from typing import Any

import pytest

from router_svc import events

SLICE = events.SSE_SLICE
# Characters JSON escapes, short and long forms, multi-byte UTF-8, and plain ASCII.
CHARS = ['"', "\\", "\n", "\t", "\x00", "\x1f", "\x7f", "é", "🌧", "\u2028", "<", "a", "b"]


def text(n: int, seed: int = 1) -> str:
    rnd = random.Random(seed)
    return "".join(rnd.choice(CHARS) for _ in range(n))


@pytest.mark.parametrize(
    "event",
    [
        {"type": "response.output_text.done", "sequence_number": 7, "text": text(3 * SLICE + 5)},
        {
            "type": "response.completed",
            "sequence_number": 9,
            "response": {
                "id": "resp_1",
                "output": [
                    {"content": [{"type": "output_text", "text": text(SLICE), "logprobs": []}]},
                    {"type": "function_call", "arguments": text(2 * SLICE + 1, seed=2)},
                ],
                "temperature": 0.5,
                "store": True,
                "metadata": {},
                "usage": None,
            },
        },
        {"type": "response.output_item.done", "sequence_number": 3, "item": {"text": "short"}},
    ],
    ids=["one long text", "two long texts in a response", "nothing long"],
)
def test_an_event_in_slices_is_the_event_encoded_whole(event: dict[str, Any]) -> None:
    pieces = list(events.sse_slices(event))
    assert b"".join(pieces) == events.sse_encode(event)
    # No piece holds much more than a slice (a character is at most 6 bytes escaped).
    assert max(map(len, pieces)) <= 6 * SLICE + 1024


def test_a_string_that_is_a_marker_is_still_encoded_exactly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A short string the same as a long one's marker (the token guessed): sent whole.
    monkeypatch.setattr(secrets, "token_hex", lambda _n: "t")
    event = {"type": "x", "text": "y" * SLICE, "other": "\x00respgw-slices-t-0"}
    pieces = list(events.sse_slices(event))
    assert b"".join(pieces) == events.sse_encode(event)
    assert len(pieces) == 3  # sse_pieces: head, the JSON whole, end
