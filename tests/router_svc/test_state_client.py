"""The router's state client: which calls it retries comes from the contract itself."""

from __future__ import annotations

import time

import pytest

from respgw.state.v1 import state_service_pb2 as pb
from router_svc import errors, state_client


def test_retryable_calls_are_those_the_proto_marks_safe() -> None:
    service = pb.DESCRIPTOR.services_by_name["StateService"]
    levels = {m.name: m.GetOptions().idempotency_level for m in service.methods}
    # Every unary RPC of the v1 contract declares itself safe to replay (Exchange is a stream
    # whose calls are retried by the rules of the RPCs they carry)...
    assert state_client.RETRYABLE == set(levels) - {"Exchange"}
    assert set(state_client._EXCHANGED) <= state_client.RETRYABLE
    # ...and the reads are marked as having no side effects at all.
    reads = {
        "GetResponse",
        "GetHistory",
        "GetConversation",
        "ListConversationItems",
        "GetConversationItem",
        "GetItems",
    }
    assert all(levels[name] == levels["GetResponse"] for name in reads)


async def test_an_unreachable_state_service_is_a_bounded_503() -> None:
    client = state_client.StateClient("127.0.0.1:9", timeout_s=1.0)
    start = time.monotonic()
    with pytest.raises(errors.StateUnavailable) as info:
        await client.call("GetResponse", pb.GetResponseRequest(tenant="t", response_id="resp_x"))
    elapsed = time.monotonic() - start
    await client.close()
    assert info.value.status == 503
    assert info.value.code == "state_unavailable"
    # Three attempts with their back-off, each bounded by the deadline: never a hang.
    assert elapsed < 3 * 1.0 + 0.5
    probe = state_client.StateClient("127.0.0.1:9", timeout_s=0.2)
    assert await probe.ready() is False
    await probe.close()
