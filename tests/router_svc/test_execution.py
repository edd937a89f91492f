"""The router's client of the execution contract: every status code maps to an OpenAI error;
each call records its metrics (against the real reference service)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from bootstrap_svc import server as bootstrap_server
from bootstrap_svc.config import BootstrapSettings
from gateway.grpcerrors import RemoteError
from router_svc import errors, execution


@pytest.mark.parametrize("code", list(grpc.StatusCode), ids=lambda c: c.name)
def test_every_status_code_is_mapped(code: grpc.StatusCode) -> None:
    assert code in execution._STATUS
    error = execution.api_error(RemoteError(code, "", "details", {}, "bootstrap.respgw.dev"))
    assert isinstance(error, errors.ApiError)
    body = error.body()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    assert 400 <= error.status < 600


def test_the_common_codes() -> None:
    def status(code: grpc.StatusCode, reason: str = "") -> int:
        return execution.api_error(RemoteError(code, reason, "x", {}, "d")).status

    assert status(grpc.StatusCode.NOT_FOUND) == 404
    assert status(grpc.StatusCode.INVALID_ARGUMENT) == 400
    assert status(grpc.StatusCode.RESOURCE_EXHAUSTED) == 429
    assert status(grpc.StatusCode.RESOURCE_EXHAUSTED, "FILE_TOO_LARGE") == 413
    assert status(grpc.StatusCode.UNAVAILABLE) == 503
    assert status(grpc.StatusCode.DEADLINE_EXCEEDED) == 504


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


LATENCY = "respgw_router_execution_call_latency_seconds_count"
FAILED = "respgw_router_execution_call_errors_total"


async def test_each_call_records_its_latency_and_failures(tmp_path: Path) -> None:
    running = await bootstrap_server.start(
        replace(
            BootstrapSettings(),
            listen="127.0.0.1:0",
            workdir=str(tmp_path / "sessions"),
            metrics_port=0,
        )
    )
    executor = execution.GrpcExecutor(f"127.0.0.1:{running.port}", timeout_s=5)
    creates, gets = _sample(LATENCY, method="CreateSession"), _sample(LATENCY, method="GetSession")
    missing = _sample(FAILED, method="GetSession", code="NOT_FOUND")
    try:
        session = await executor.create_session(
            tenant="acme",
            request_id="req_metrics",
            name="metrics",
            idle_ttl_s=None,
            memory_limit_bytes=0,
        )
        found = await executor.get_session("acme", session.session_id)
        assert found.session_id == session.session_id
        with pytest.raises(errors.ApiError) as info:
            await executor.get_session("acme", "cntr_nothere")
        assert info.value.status == 404
    finally:
        await executor.close()
        await running.stop()
    assert _sample(LATENCY, method="CreateSession") == creates + 1
    assert _sample(LATENCY, method="GetSession") == gets + 2
    assert _sample(FAILED, method="GetSession", code="NOT_FOUND") == missing + 1
    assert _sample(FAILED, method="CreateSession", code="OK") == 0
