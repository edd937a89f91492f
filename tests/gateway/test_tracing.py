"""Tracing through the real router, state service and reference bootstrap service (in-process,
spans caught by an in-memory exporter), with the fake hub recording the headers it was sent."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from gateway import tracing
from tests.fakehub import FakeHub, Reply
from tests.gateway.conftest import CODE_INTERPRETER, InProcess, Processes
from tests.support import REPO, ROUTER_READY, Process

STATE = "respgw.state.v1.StateService"
BOOTSTRAP = "respgw.bootstrap.v1.BootstrapService"


def one(spans: list[ReadableSpan], name: str, kind: SpanKind) -> ReadableSpan:
    found = [s for s in spans if s.name == name and s.kind == kind]
    assert len(found) == 1, f"{name} {kind}: {[(s.name, s.kind) for s in spans]}"
    return found[0]


def finished(exporter: InMemorySpanExporter, requests: int = 1) -> list[ReadableSpan]:
    """The finished spans, once the router's request spans are among them: the router ends one
    after sending the last byte, which the client may have read a moment before."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        got = list(exporter.get_finished_spans())
        served = [s for s in got if s.kind == SpanKind.SERVER and s.name[:1] in "GP"]
        if len(served) >= requests:
            return got
        time.sleep(0.01)
    raise AssertionError("the router's request span never ended")


def attr(span: ReadableSpan, key: str) -> object:
    return (span.attributes or {}).get(key)


def times(span: ReadableSpan) -> tuple[int, int]:
    assert span.start_time is not None and span.end_time is not None
    return span.start_time, span.end_time


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def traceparent(trace_id: int, span_id: int) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-01"


def create(gw: InProcess, *, stream: bool, headers: dict[str, str] | None = None) -> str:
    body = {"input": "trace me", "tools": [CODE_INTERPRETER], "stream": stream}
    with httpx.Client(timeout=20) as client:
        resp = client.post(f"{gw.base}/v1/responses", json=body, headers=headers or {})
    assert resp.status_code == 200, resp.text
    return resp.text


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_one_trace_covers_router_state_bootstrap_and_hub(
    inprocess: InProcess, hub: FakeHub, spans: InMemorySpanExporter, stream: bool
) -> None:
    create(inprocess, stream=stream)
    got = finished(spans)

    router = one(got, "POST /v1/responses", SpanKind.SERVER)
    prepare_client = one(got, f"{BOOTSTRAP}/PrepareTools", SpanKind.CLIENT)
    prepare_server = one(got, f"{BOOTSTRAP}/PrepareTools", SpanKind.SERVER)
    put_client = one(got, f"{STATE}/PutTurn", SpanKind.CLIENT)
    put_server = one(got, f"{STATE}/PutTurn", SpanKind.SERVER)
    hub_call = one(got, "POST /chat/completions", SpanKind.CLIENT)

    # One trace, and every span of this process belongs to it.
    trace_id = router.context.trace_id
    assert {s.context.trace_id for s in got} == {trace_id}
    assert router.parent is None
    # The router's calls are children of its request span; each service's span is a child of
    # the call that reached it, across a real gRPC hop.
    assert parent_of(prepare_client) == router.context.span_id
    assert parent_of(put_client) == router.context.span_id
    assert parent_of(hub_call) == router.context.span_id
    assert parent_of(prepare_server) == prepare_client.context.span_id
    assert parent_of(put_server) == put_client.context.span_id
    # In order: tools prepared, then the hub, then the turn stored, all within the request.
    assert times(router)[0] <= times(prepare_client)[0]
    assert times(prepare_client)[1] <= times(hub_call)[0]
    assert times(hub_call)[0] <= times(put_client)[0]
    assert times(put_client)[1] <= times(router)[1]

    assert attr(router, "http.route") == "/v1/responses"
    assert attr(router, "http.response.status_code") == 200
    assert attr(put_server, "rpc.system") == "grpc"
    assert attr(put_server, "rpc.method") == "PutTurn"
    assert attr(put_server, "rpc.grpc.status_code") == 0
    assert attr(hub_call, "respgw.stream") is stream
    failed = [
        (s.name, s.kind, s.status.description)
        for s in got
        if s.status.status_code == StatusCode.ERROR
    ]
    assert not failed, failed

    # The hub was told the trace: its traceparent names the hub call span.
    version, sent_trace, sent_parent, flags = hub.headers[-1]["traceparent"].split("-")
    assert (version, sent_trace, sent_parent) == (
        "00",
        f"{trace_id:032x}",
        f"{hub_call.context.span_id:016x}",
    )
    assert int(flags, 16) & 1, "the trace is sampled"


def test_the_router_continues_the_callers_trace(
    inprocess: InProcess, hub: FakeHub, spans: InMemorySpanExporter
) -> None:
    caller_trace, caller_span = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
    create(inprocess, stream=False, headers={"traceparent": traceparent(caller_trace, caller_span)})
    got = finished(spans)
    router = one(got, "POST /v1/responses", SpanKind.SERVER)
    assert router.context.trace_id == caller_trace
    assert parent_of(router) == caller_span
    assert {s.context.trace_id for s in got} == {caller_trace}
    assert hub.headers[-1]["traceparent"].startswith(f"00-{caller_trace:032x}-")


def test_failed_calls_mark_their_spans(
    inprocess: InProcess, hub: FakeHub, spans: InMemorySpanExporter
) -> None:
    hub.enqueue(Reply(status=500))
    with httpx.Client(timeout=20) as client:
        failed = client.post(f"{inprocess.base}/v1/responses", json={"input": "x"})
        # Its input items: GetResponse, a unary call, which the server spans too (GET of the
        # response itself reads with GetResponseChunked, a server stream it does not).
        missing = client.get(f"{inprocess.base}/v1/responses/resp_missing/input_items")
    assert failed.status_code == 502
    assert missing.status_code == 404
    got = finished(spans, requests=2)

    hub_call = one(got, "POST /chat/completions", SpanKind.CLIENT)
    assert hub_call.status.status_code == StatusCode.ERROR
    assert any(e.name == "exception" for e in hub_call.events)
    # A 5xx answer is the gateway's failure; a 404 is the caller's, not an error of the server.
    posted = one(got, "POST /v1/responses", SpanKind.SERVER)
    assert posted.status.status_code == StatusCode.ERROR
    fetched = one(got, "GET /v1/responses/{response_id}/input_items", SpanKind.SERVER)
    assert attr(fetched, "http.response.status_code") == 404
    assert fetched.status.status_code != StatusCode.ERROR
    # NOT_FOUND fails the client's call, but is no fault of the state service.
    get_client = one(got, f"{STATE}/GetResponse", SpanKind.CLIENT)
    get_server = one(got, f"{STATE}/GetResponse", SpanKind.SERVER)
    assert attr(get_client, "rpc.grpc.status_code") == 5
    assert get_client.status.status_code == StatusCode.ERROR
    assert attr(get_server, "rpc.grpc.status_code") == 5
    assert get_server.status.status_code != StatusCode.ERROR


@pytest.mark.parametrize(
    ("code", "server", "error"),
    [
        ("OK", False, False),
        ("CANCELLED", False, False),  # the caller gave the call up itself
        ("DEADLINE_EXCEEDED", False, True),
        ("ALREADY_EXISTS", False, True),
        ("ALREADY_EXISTS", True, False),  # the caller's doing, not the server's fault
        ("UNAVAILABLE", True, True),
    ],
)
def test_a_grpc_span_is_failed_only_for_a_fault(
    spans: InMemorySpanExporter, code: str, server: bool, error: bool
) -> None:
    span = tracing.start_client("svc/Method", tracing.grpc_attributes("/svc/Method"))
    tracing.end_grpc(span, code, server=server)
    (got,) = spans.get_finished_spans()
    assert (got.status.status_code == StatusCode.ERROR) is error


def test_tracing_off_makes_no_spans_and_sends_no_traceparent(
    inprocess: InProcess, hub: FakeHub
) -> None:
    # An exporter that would catch any span, attached and then switched off as at start.
    exporter = InMemorySpanExporter()
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)
    tracing.disable()
    try:
        create(inprocess, stream=False)
        create(inprocess, stream=True)
    finally:
        provider.shutdown()
    assert tracing.enabled is False
    assert exporter.get_finished_spans() == ()
    assert len(hub.headers) == 2
    for sent in hub.headers:
        assert "traceparent" not in sent
        assert "tracestate" not in sent
        assert sent["x-request-id"]


def test_setup_with_no_endpoint_leaves_tracing_off() -> None:
    tracing.setup("respgw-test", "")
    assert tracing.enabled is False


def test_setup_without_the_sdk_logs_one_error_and_runs_untraced() -> None:
    # A fresh interpreter in which the SDK cannot be imported, as without the tracing extra.
    script = (
        "import sys\n"
        "sys.modules['opentelemetry.sdk'] = None\n"
        "from gateway import logs, tracing\n"
        "logs.setup('info', 'json')\n"
        "tracing.setup('respgw-router', 'http://127.0.0.1:4317')\n"
        "print(tracing.enabled)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert done.stdout.strip() == "False"
    errors = [line for line in done.stderr.splitlines() if '"level":"error"' in line]
    assert len(errors) == 1, done.stderr
    assert "not installed" in errors[0]
    assert "http://127.0.0.1:4317" in errors[0]


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """The receiving end of OTLP/gRPC, as an OpenTelemetry collector runs it: keeps every export."""

    def __init__(self) -> None:
        self.received: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.lock = threading.Lock()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self.lock:
            self.received.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[tuple[str, Any]]:
        """(service.name, span) of everything received so far."""
        out: list[tuple[str, Any]] = []
        with self.lock:
            for request in self.received:
                for rs in request.resource_spans:
                    service = next(
                        a.value.string_value
                        for a in rs.resource.attributes
                        if a.key == "service.name"
                    )
                    out.extend((service, s) for ss in rs.scope_spans for s in ss.spans)
        return out


@pytest.fixture
def collector() -> Iterator[tuple[Collector, int]]:
    receiver = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield receiver, port
    finally:
        server.stop(0)


def test_an_otel_endpoint_exports_the_routers_spans_over_otlp(
    processes: Processes, hub: FakeHub, collector: tuple[Collector, int]
) -> None:
    receiver, port = collector
    router = Process(
        ["router", "--port", "0", "--otel-endpoint", f"http://127.0.0.1:{port}"],
        env={
            "RESPGW_HUB_URL": hub.url,
            "RESPGW_DEFAULT_MODEL": "fake-model",
            "RESPGW_STATE_ADDRESS": processes.state_address,
            "RESPGW_BOOTSTRAP_ADDRESS": processes.bootstrap_address,
            "OTEL_BSP_SCHEDULE_DELAY": "50",  # export within 50 ms instead of 5 s
        },
    )
    try:
        base = f"http://127.0.0.1:{router.start(ROUTER_READY)}"
        assert any("tracing on" in line for line in router.lines)
        with httpx.Client(timeout=20) as client:
            resp = client.post(
                f"{base}/v1/responses", json={"input": "export me", "tools": [CODE_INTERPRETER]}
            )
        assert resp.status_code == 200, resp.text
        wanted = {
            "POST /v1/responses",
            "POST /chat/completions",
            f"{STATE}/PutTurn",
            f"{BOOTSTRAP}/PrepareTools",
        }
        deadline = time.monotonic() + 10
        while {s.name for _, s in receiver.spans()} < wanted and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        router.stop()
    got = receiver.spans()
    assert {s.name for _, s in got} >= wanted, [s.name for _, s in got]
    assert {service for service, _ in got} == {"respgw-router"}
    request = next(s for _, s in got if s.name == "POST /v1/responses")
    assert {s.trace_id for _, s in got if s.name in wanted} == {request.trace_id}
    assert hub.headers[-1]["traceparent"].split("-")[1] == request.trace_id.hex()
