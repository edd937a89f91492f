"""The Prometheus metrics of every service, scraped over HTTP from the services running as
processes after real traffic: request counts and latencies, hub and state call latencies, errors
by code, the open-streams gauge, and the gRPC servers' per-RPC counts and latencies. And where the
gRPC services' /metrics binds: the host they listen on, or the metrics host setting."""

from __future__ import annotations

import argparse
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bootstrap_svc.config import BootstrapSettings
from gateway import metrics, settings
from state_svc.config import StateSettings
from tests.fakehub import FakeHub, Reply
from tests.gateway.conftest import CODE_INTERPRETER, Processes, free_port
from tests.support import STATE_READY, Process

Labels = dict[str, str]


class Scrape:
    """One scrape of a /metrics endpoint, parsed with Prometheus' own text parser."""

    def __init__(self, http: httpx.Client, url: str) -> None:
        resp = http.get(url)
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/plain")
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(resp.text):
            self.types[family.name] = family.type
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def value(self, name: str, labels: Labels | None = None) -> float:
        """The sample's value; 0 when it does not exist (yet)."""
        return self.samples.get((name, frozenset((labels or {}).items())), 0.0)

    def label_sets(self, name: str) -> list[Labels]:
        return [dict(labels) for (n, labels) in self.samples if n == name]


def router_metrics(processes: Processes, http: httpx.Client) -> Scrape:
    return Scrape(http, f"{processes.base}/metrics")


def test_router_counts_and_times_requests_hub_and_state_calls(
    processes: Processes, hub: FakeHub, http: httpx.Client
) -> None:
    before = router_metrics(processes, http)
    route = {"route": "POST /v1/responses"}
    for _ in range(2):
        resp = http.post(
            f"{processes.base}/v1/responses",
            json={"input": "count me", "tools": [CODE_INTERPRETER]},
        )
        assert resp.status_code == 200, resp.text
    after = router_metrics(processes, http)

    assert after.types["respgw_router_requests"] == "counter"
    delta = after.value("respgw_router_requests_total", {**route, "status": "200"}) - before.value(
        "respgw_router_requests_total", {**route, "status": "200"}
    )
    assert delta == 2
    assert after.types["respgw_router_request_latency_seconds"] == "histogram"
    count = "respgw_router_request_latency_seconds_count"
    assert after.value(count, route) - before.value(count, route) == 2
    assert after.value("respgw_router_request_latency_seconds_sum", route) > 0
    inf = after.value("respgw_router_request_latency_seconds_bucket", {**route, "le": "+Inf"})
    assert inf == after.value(count, route)

    hub_labels = {"path": "/chat/completions", "stream": "false"}
    hub_count = "respgw_router_hub_latency_seconds_count"
    assert after.types["respgw_router_hub_latency_seconds"] == "histogram"
    assert after.value(hub_count, hub_labels) - before.value(hub_count, hub_labels) == 2

    state_count = "respgw_router_state_call_latency_seconds_count"
    assert after.types["respgw_router_state_call_latency_seconds"] == "histogram"
    put = {"method": "PutTurn"}
    assert after.value(state_count, put) - before.value(state_count, put) == 2


def test_router_counts_errors_by_status_and_code(
    processes: Processes, hub: FakeHub, http: httpx.Client
) -> None:
    before = router_metrics(processes, http)
    missing = http.get(f"{processes.base}/v1/responses/resp_doesnotexist")
    assert missing.status_code == 404
    hub.enqueue(Reply(status=500))
    upstream = http.post(f"{processes.base}/v1/responses", json={"input": "fail"})
    assert upstream.status_code == 502
    invalid = http.post(f"{processes.base}/v1/responses", json={"input": 5})
    assert invalid.status_code == 400
    after = router_metrics(processes, http)

    def grew(name: str, labels: Labels) -> float:
        return after.value(name, labels) - before.value(name, labels)

    assert after.types["respgw_router_errors"] == "counter"
    assert grew("respgw_router_errors_total", {"status": "404", "code": "not_found"}) == 1
    assert grew("respgw_router_errors_total", {"status": "502", "code": "upstream_error"}) == 1
    invalid_code = invalid.json()["error"]["code"] or ""
    assert grew("respgw_router_errors_total", {"status": "400", "code": invalid_code}) == 1
    assert grew("respgw_router_hub_errors_total", {"code": "upstream_error"}) == 1
    assert (
        grew(
            "respgw_router_state_call_errors_total",
            {"method": "GetResponseChunked", "code": "NOT_FOUND"},
        )
        == 1
    )
    assert (
        grew(
            "respgw_router_requests_total",
            {"route": "GET /v1/responses/{response_id}", "status": "404"},
        )
        == 1
    )


def test_open_streams_gauge_follows_a_live_stream(
    processes: Processes, hub: FakeHub, http: httpx.Client
) -> None:
    gauge = "respgw_router_open_streams"
    before = router_metrics(processes, http)
    assert before.types[gauge] == "gauge"
    assert before.value(gauge) == 0
    # A slow hub keeps the stream open while the gauge is read.
    hub.enqueue(Reply(text="one two three four five six", chunk_delay_s=0.15))
    during: list[float] = []
    with http.stream(
        "POST", f"{processes.base}/v1/responses", json={"input": "slow", "stream": True}
    ) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        assert next(lines).startswith("event: response.created")
        during.append(router_metrics(processes, http).value(gauge))
        rest = list(lines)
    assert any("response.completed" in line for line in rest)
    assert during == [1]
    after = router_metrics(processes, http)
    assert after.value(gauge) == 0
    streamed = {"path": "/chat/completions", "stream": "true"}
    hub_count = "respgw_router_hub_latency_seconds_count"
    assert after.value(hub_count, streamed) - before.value(hub_count, streamed) == 1
    # The stream lasted while the hub sent six chunks 0.15 s apart, and its time says so.
    hub_sum = "respgw_router_hub_latency_seconds_sum"
    assert after.value(hub_sum, streamed) - before.value(hub_sum, streamed) >= 0.8


def test_grpc_services_count_and_time_each_rpc(
    processes: Processes, hub: FakeHub, http: httpx.Client
) -> None:
    state_before = Scrape(http, processes.state_metrics)
    bootstrap_before = Scrape(http, processes.bootstrap_metrics)
    ok = http.post(
        f"{processes.base}/v1/responses", json={"input": "serve me", "tools": [CODE_INTERPRETER]}
    )
    assert ok.status_code == 200, ok.text
    # GET of a response reads with GetResponseChunked (a server stream), its input items with
    # GetResponse: both are counted, each as one call.
    assert http.get(f"{processes.base}/v1/responses/{ok.json()['id']}").status_code == 200
    assert http.get(f"{processes.base}/v1/responses/resp_nothere").status_code == 404
    missing = http.get(f"{processes.base}/v1/responses/resp_nothere/input_items")
    assert missing.status_code == 404

    def grew(after: Scrape, before: Scrape, name: str, labels: Labels) -> float:
        return after.value(name, labels) - before.value(name, labels)

    # A failed call's status reaches the client before the server's interceptor has counted it
    # (abort sends the status first), so a scrape right after may be a moment early.
    deadline = time.monotonic() + 5
    while True:
        state = Scrape(http, processes.state_metrics)
        counted = grew(
            state,
            state_before,
            "respgw_grpc_server_requests_total",
            {"method": "GetResponse", "code": "NOT_FOUND"},
        )
        counted = min(
            counted,
            grew(
                state,
                state_before,
                "respgw_grpc_server_requests_total",
                {"method": "GetResponseChunked", "code": "NOT_FOUND"},
            ),
        )
        if counted >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    bootstrap = Scrape(http, processes.bootstrap_metrics)

    requests = "respgw_grpc_server_requests_total"
    latency = "respgw_grpc_server_latency_seconds_count"
    for scrape in (state, bootstrap):
        assert scrape.types["respgw_grpc_server_requests"] == "counter"
        assert scrape.types["respgw_grpc_server_latency_seconds"] == "histogram"

    assert grew(state, state_before, requests, {"method": "PutTurn", "code": "OK"}) == 1
    assert grew(state, state_before, latency, {"method": "PutTurn"}) == 1
    assert grew(state, state_before, requests, {"method": "GetResponse", "code": "NOT_FOUND"}) == 1
    assert grew(state, state_before, latency, {"method": "GetResponse"}) == 1
    chunked = {"method": "GetResponseChunked"}
    assert grew(state, state_before, requests, {**chunked, "code": "OK"}) == 1
    assert grew(state, state_before, requests, {**chunked, "code": "NOT_FOUND"}) == 1
    assert grew(state, state_before, latency, chunked) == 2

    assert (
        grew(bootstrap, bootstrap_before, requests, {"method": "PrepareTools", "code": "OK"}) == 1
    )
    assert grew(bootstrap, bootstrap_before, latency, {"method": "PrepareTools"}) == 1
    # Each process exposes its own RPCs only (the bootstrap service serves the ExecutionService
    # too, whose capabilities the router reads before it offers code_interpreter).
    assert {ls["method"] for ls in bootstrap.label_sets(requests)} <= {
        "PrepareTools",
        "ReleaseTools",
        "Check",
        "GetExecutionCapabilities",
    }
    assert "PrepareTools" not in {ls["method"] for ls in state.label_sets(requests)}


# -- where /metrics binds -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "host"),
    [
        ("127.0.0.1:50051", "127.0.0.1"),
        ("0.0.0.0:50051", "0.0.0.0"),
        ("[::]:50051", "::"),
        ("[::1]:0", "::1"),
        ("localhost:50052", "localhost"),
        ("respgw-state-0.respgw-state:50051", "respgw-state-0.respgw-state"),
    ],
)
def test_listen_host(listen: str, host: str) -> None:
    assert metrics.listen_host(listen) == host


@pytest.mark.parametrize("listen", [":50051", "50051", "[]:50051", "unix:/run/respgw.sock", "h:x"])
def test_listen_host_refuses_an_address_without_one(listen: str) -> None:
    with pytest.raises(ValueError, match="metrics host"):
        metrics.listen_host(listen)


@pytest.mark.parametrize("cls", [StateSettings, BootstrapSettings])
def test_metrics_host_is_the_listen_host_unless_set(cls: type[Any]) -> None:
    assert metrics.metrics_host(cls()) == "127.0.0.1", "the default listen is loopback"
    assert metrics.metrics_host(replace(cls(), listen="0.0.0.0:1")) == "0.0.0.0"
    assert metrics.metrics_host(replace(cls(), listen="[::]:1")) == "::"
    chosen = replace(cls(), listen="0.0.0.0:1", metrics_host="10.1.2.3")
    assert metrics.metrics_host(chosen) == "10.1.2.3"


@pytest.mark.parametrize(
    ("cls", "prefix"), [(StateSettings, "STATE"), (BootstrapSettings, "BOOTSTRAP")]
)
def test_metrics_host_is_a_flag_and_a_variable(
    cls: type[Any], prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert f"RESPGW_{prefix}_METRICS_HOST" in settings.env_names(cls)
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser, cls)
    parsed = settings.from_namespace(cls, parser.parse_args(["--metrics-host", "::1"]))
    assert parsed.metrics_host == "::1"
    monkeypatch.setenv(f"RESPGW_{prefix}_METRICS_HOST", "127.0.0.9")
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser, cls)
    assert settings.from_namespace(cls, parser.parse_args([])).metrics_host == "127.0.0.9"


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except ConnectionRefusedError:
        return False


@pytest.mark.parametrize(
    ("listen", "metrics_host", "bound", "not_bound"),
    [
        ("127.0.0.2:0", "", "127.0.0.2", "127.0.0.1"),  # the service's own host
        ("127.0.0.2:0", "127.0.0.3", "127.0.0.3", "127.0.0.2"),  # the metrics host setting
    ],
)
def test_service_metrics_bind_only_the_chosen_address(
    listen: str, metrics_host: str, bound: str, not_bound: str, http: httpx.Client
) -> None:
    # Linux routes all of 127.0.0.0/8 to loopback: a listener on 127.0.0.2 does not answer on
    # 127.0.0.1, one on 0.0.0.0 would answer on both.
    port = free_port()
    chosen = replace(StateSettings(), listen=listen, metrics_port=port, metrics_host=metrics_host)
    server = metrics.serve_service_metrics(chosen)
    assert server is not None
    try:
        assert server.server_address[0] == bound
        Scrape(http, f"http://{bound}:{port}/metrics")
        for other in {not_bound, "127.0.0.1"}:
            assert not _answers(other, port), f"/metrics also answers on {other}"
    finally:
        server.shutdown()
        server.server_close()


def test_metrics_port_zero_serves_nothing() -> None:
    assert metrics.serve_service_metrics(replace(BootstrapSettings(), metrics_port=0)) is None
    assert metrics.serve_metrics(0) is None


@pytest.mark.parametrize("service", ["state", "bootstrap"])
def test_a_service_on_loopback_keeps_its_metrics_there(
    service: str, tmp_path: Path, http: httpx.Client
) -> None:
    port = free_port()
    prefix = service.upper()
    proc = Process(
        [
            service,
            "--listen",
            "127.0.0.2:0",
            *(["--backend", "memory"] if service == "state" else []),
        ],
        env={
            f"RESPGW_{prefix}_METRICS_PORT": str(port),
            "RESPGW_BOOTSTRAP_WORKDIR": str(tmp_path / "sessions"),
        },
    )
    proc.start(STATE_READY)
    try:
        deadline = time.monotonic() + 10
        while not _answers("127.0.0.2", port):  # the state service opens /metrics after gRPC
            assert time.monotonic() < deadline, "/metrics never answered on 127.0.0.2"
            time.sleep(0.05)
        Scrape(http, f"http://127.0.0.2:{port}/metrics")
        assert not _answers("127.0.0.1", port), "/metrics answers on every interface"
    finally:
        proc.stop()
