"""Optional OpenTelemetry tracing: off unless an OTLP endpoint is configured and the ``tracing``
extra (opentelemetry-sdk and the OTLP/gRPC exporter) is installed.

Call sites on the hot paths test the module-level :data:`enabled` flag and do nothing else while it
is off: no span objects, no context work, no OpenTelemetry import. When it is on:

- the router starts a SERVER span per HTTP request (continuing the caller's W3C trace, if any),
  and CLIENT spans around its state, bootstrap and hub calls; each client span's W3C
  ``traceparent`` goes out in the gRPC metadata or the hub's HTTP headers;
- the gRPC services start a SERVER span per call, child of the caller's client span
  (``gateway.metrics.ServerInterceptor``).

Spans are made with the OpenTelemetry API directly rather than with the auto-instrumentation
packages: five small hooks (router middleware, hub client, state client, bootstrap client, gRPC
server interceptor) cover every hop, nothing is patched into grpc, aiohttp or Starlette, and the
"off" cost stays one boolean test.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span as Span
    from opentelemetry.trace import Tracer, TracerProvider
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    from opentelemetry.util.types import AttributeValue

    Token = contextvars.Token[Context]

log = logging.getLogger(__name__)

enabled: bool = False
"""True while tracing is on; hot paths check it before touching anything else here."""

TRACE_HEADERS = ("traceparent", "tracestate")
"""The W3C trace context headers (and gRPC metadata keys) carried from caller to callee."""

_tracer: Tracer | None = None
_propagator: TraceContextTextMapPropagator | None = None

# gRPC codes that are the server's fault: a server span ends in error on these only (the
# OpenTelemetry conventions for gRPC); a client span ends in error on any code but OK.
_SERVER_FAULTS = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)
_GRPC_CODE_NUMBERS = {
    "OK": 0,
    "CANCELLED": 1,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "ABORTED": 10,
    "OUT_OF_RANGE": 11,
    "UNIMPLEMENTED": 12,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
    "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}


def setup(service_name: str, settings_value: str) -> None:
    """Turns tracing on for this process when ``settings_value`` (an OTLP/gRPC endpoint such as
    ``http://otel-collector:4317``) is set; spans are batched and exported under
    ``service.name`` = ``service_name``.

    An empty value leaves tracing off. A value without the ``tracing`` extra installed logs one
    error and leaves tracing off, so a missing package never stops a service. Calling it again
    once tracing is on changes nothing.
    """
    if not settings_value or enabled:
        return
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        log.error(
            "tracing is configured but OpenTelemetry is not installed (install the 'tracing' "
            "extra); running without tracing",
            extra={"otel_endpoint": settings_value, "missing": exc.name or str(exc)},
        )
        return
    provider = SdkTracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings_value)))
    # Global too, so that any library instrumented with OpenTelemetry joins the same traces.
    trace.set_tracer_provider(provider)
    enable(provider)
    log.info("tracing on", extra={"otel_endpoint": settings_value, "service_name": service_name})


def enable(provider: TracerProvider) -> None:
    """Turns tracing on with spans going to ``provider`` (tests give one with an in-memory
    exporter; :func:`setup` gives one that exports over OTLP)."""
    global enabled, _tracer, _propagator
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _tracer = provider.get_tracer("respgw")
    _propagator = TraceContextTextMapPropagator()
    enabled = True


def disable() -> None:
    """Turns tracing off; spans already started still end normally."""
    global enabled, _tracer
    enabled = False
    _tracer = None


def start_server(
    name: str, carrier: Mapping[str, str], attributes: Mapping[str, AttributeValue]
) -> tuple[Span, Token]:
    """Starts the SERVER span of one incoming call and makes it current. ``carrier`` holds the
    caller's trace headers (see :data:`TRACE_HEADERS`); when it names a trace, the span continues
    it. End the span with :func:`end_server`."""
    from opentelemetry import context, trace

    assert _tracer is not None and _propagator is not None, "tracing is off"
    parent = _propagator.extract(carrier) if carrier else None
    span = _tracer.start_span(
        name, context=parent, kind=trace.SpanKind.SERVER, attributes=attributes
    )
    return span, context.attach(trace.set_span_in_context(span, parent))


def end_server(span: Span, token: Token, error: BaseException | None = None) -> None:
    """Ends a span from :func:`start_server` and restores the context it replaced."""
    try:
        end(span, error)
    finally:
        detach(token)


def detach(token: Token) -> None:
    """Restores the context that :func:`start_server` replaced (after ending its span some
    other way, for example with :func:`end_grpc`)."""
    from opentelemetry import context

    context.detach(token)


def start_client(name: str, attributes: Mapping[str, AttributeValue]) -> Span:
    """Starts a CLIENT span, child of the current span, without making it current (a hub stream
    is resumed from another task, where a context made current here could not be restored)."""
    from opentelemetry import trace

    assert _tracer is not None, "tracing is off"
    return _tracer.start_span(name, kind=trace.SpanKind.CLIENT, attributes=attributes)


def headers(span: Span) -> dict[str, str]:
    """The W3C trace context headers that make the callee's spans children of ``span``."""
    from opentelemetry import trace

    assert _propagator is not None, "tracing is off"
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def grpc_metadata(
    span: Span, metadata: Iterable[tuple[str, str]] = ()
) -> tuple[tuple[str, str], ...]:
    """``metadata`` plus the W3C trace context of ``span``, for an outgoing gRPC call."""
    return (*metadata, *headers(span).items())


def grpc_attributes(full_method: str) -> dict[str, AttributeValue]:
    """The OpenTelemetry RPC attributes of a gRPC method named ``/package.Service/Method``."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}


def end_grpc(span: Span, code: str, *, server: bool, error: BaseException | None = None) -> None:
    """Ends a gRPC span with the call's status code name (``"OK"``, ``"NOT_FOUND"``...). A
    client call that ends CANCELLED was given up by its caller, which is not a failure (as in
    :func:`end`); a server marks only the codes that are its own fault."""
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("rpc.grpc.status_code", _GRPC_CODE_NUMBERS.get(code, 2))
    failed = code in _SERVER_FAULTS if server else code not in ("OK", "CANCELLED")
    if failed:
        if error is not None:
            span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, code))
    span.end()


def http_response(span: Span, route: str, status: int) -> None:
    """Names an HTTP server span after its route once routing is done, and records the status
    (a 5xx marks the span failed; a 4xx is the client's doing). The span ends later."""
    from opentelemetry.trace import Status, StatusCode

    span.update_name(route)
    span.set_attribute("http.route", route.partition(" ")[2] or route)
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))


def end(span: Span, error: BaseException | None = None) -> None:
    """Ends a span; an ``error`` that is an ``Exception`` (a cancelled or closed call is not a
    failure) is recorded and marks the span failed."""
    from opentelemetry.trace import Status, StatusCode

    if isinstance(error, Exception):
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, type(error).__name__))
    span.end()
