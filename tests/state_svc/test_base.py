"""The backends' shared rules (state_svc/backends/base.py) that no RPC shows directly."""

from __future__ import annotations

from state_svc.backends import base


def test_a_turns_digest_stays_what_stored_turns_hold() -> None:
    """A replay of a turn stored by an earlier release must still match its stored digest: the
    digest is pinned to the bytes of the length-prefixed encoding (``base._Digest``)."""
    turn = base.Turn(
        id="resp_1",
        response_json=b'{"id":"resp_1"}',
        previous_response_id="resp_0",
        idempotency_key="k\u00e9y",
        stream_events_json=b'[{"a":1}]',
        in_progress=True,
        input_items=(base.Item("msg_a", b'{"id":"msg_a"}'),),
        output_items=(
            base.Item("msg_b", memoryview(b'xx{"id":"msg_b"}')[2:]),  # a view, as from wire
            base.Item("msg_c", b"{}"),
        ),
    )
    assert (
        base.turn_digest(turn).hex()
        == "43828fa4bfa28b3cfb8201e8e90e19e859f38e13cfefa96cff00ee45a1720e46"
    )
    large = base.Turn(id="resp_2", response_json=b'{"x":"' + b"a" * 100_000 + b'"}')
    assert (
        base.turn_digest(large).hex()
        == "101185af80ae0dd35485a8deb7a86d2bad6c0be26281677a88667f77ed8b0b12"
    )


def test_the_digest_is_the_length_prefixed_encoding_of_every_caller_set_field() -> None:
    turn = base.Turn(
        id="r",
        response_json=b"{}",
        conversation_id="conv_1",
        input_items=(base.Item("a", b"{}"),),
    )
    d = base._Digest()
    for value in ("r", "", "conv_1", "", b"{}", b"", 0):
        d.add(value)
    d.add_items(turn.input_items)
    d.add_items(())
    assert base.turn_digest(turn) == d.digest()
    assert base.turn_digest(turn) != base.turn_digest(base.Turn(id="r", response_json=b"{ }"))


def test_a_stored_turn_has_the_server_set_times_and_positions() -> None:
    turn = base.Turn(
        id="r",
        response_json=b"{}",
        previous_response_id="p",
        input_items=(base.Item("a", b"{}"), base.Item("b", b"{}")),
        output_items=(base.Item("c", b"{}"),),
        idempotency_key="k",
        stream_events_json=b"[]",
        in_progress=True,
    )
    stored = base.stored_turn(turn, 7, 9)
    assert stored == base.Turn(
        id="r",
        response_json=b"{}",
        previous_response_id="p",
        input_items=(base.Item("a", b"{}", 1, 7), base.Item("b", b"{}", 2, 7)),
        output_items=(base.Item("c", b"{}", 1, 7),),
        idempotency_key="k",
        create_time_us=7,
        expire_time_us=9,
        stream_events_json=b"[]",
        in_progress=True,
    )
