"""The Prometheus metrics of every service, scraped over HTTP from the services running as
processes after real traffic: request counts and latencies, hub and state call latencies, errors
by code, the open-streams gauge, and the gRPC servers' per-RPC counts and latencies."""

from __future__ import annotations

import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.fakehub import FakeHub, Reply
from tests.gateway.conftest import CODE_INTERPRETER, Processes

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
            "respgw_router_state_call_errors_total", {"method": "GetResponse", "code": "NOT_FOUND"}
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
    assert http.get(f"{processes.base}/v1/responses/resp_nothere").status_code == 404

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

    assert (
        grew(bootstrap, bootstrap_before, requests, {"method": "PrepareTools", "code": "OK"}) == 1
    )
    assert grew(bootstrap, bootstrap_before, latency, {"method": "PrepareTools"}) == 1
    # Each process exposes its own RPCs only.
    assert {ls["method"] for ls in bootstrap.label_sets(requests)} <= {
        "PrepareTools",
        "ReleaseTools",
        "Check",
    }
    assert "PrepareTools" not in {ls["method"] for ls in state.label_sets(requests)}
