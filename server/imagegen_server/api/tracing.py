"""OpenTelemetry spans for each generation request, off unless the standard `OTEL_*` variables
turn them on.

A request's span (`imagegen.Generate` / `imagegen.StreamProgress`, kind SERVER) is the child of
the caller's W3C `traceparent` (gRPC metadata, or an HTTP header) when there is one. Under it:
`queue` (accepted to its first step), one `denoise step` per step it ran, with the rows of that
transformer call (`imagegen.batch_rows`), `decode` (its last step to its images reaching the
job table) and `encode`. The engine thread records only (began, ended, rows) per step on the
request (`Request.step_log`); the spans are made on the event loop when the request ends (by
the job table, api/jobs.py), so the engine thread never touches OpenTelemetry.

Off (no `OTEL_TRACES_EXPORTER`, or `none`, or `OTEL_SDK_DISABLED=true`) nothing is imported,
no span is made and no step is logged: tracing costs nothing then. On, `otlp` exports over gRPC
to `OTEL_EXPORTER_OTLP_ENDPOINT` (and the exporter's other standard variables), `console`
prints; `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` name the resource.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

from ..base.request import Request

DEFAULT_SERVICE_NAME = "imagegen-server"
TRACE_HEADERS = ("traceparent", "tracestate")


class Tracing:
    """Makes the spans of requests; every method is a no-op when `enabled` is False."""

    def __init__(self, provider: Any = None) -> None:
        self._tracer = provider.get_tracer("imagegen_server") if provider is not None else None

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    @classmethod
    def from_environment(cls) -> Tracing:
        """Tracing as the `OTEL_*` variables configure it.

        Raises:
            ValueError: an exporter that is unknown or whose package is missing.
        """
        exporters = os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
        disabled = os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
        if disabled or exporters in ("", "none"):
            return cls(None)
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        name = os.environ.get("OTEL_SERVICE_NAME", DEFAULT_SERVICE_NAME)
        provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
        for exporter in exporters.split(","):
            provider.add_span_processor(BatchSpanProcessor(_exporter(exporter.strip())))
        return cls(provider)

    @contextlib.contextmanager
    def request_span(self, rpc: str, metadata: Iterable[Any]) -> Iterator[None]:
        """The request's span, current while the call runs; its parent from `traceparent`."""
        span = self.start_request_span(rpc, metadata)
        try:
            with span.current():
                yield
        finally:
            span.end(rpc)

    def start_request_span(self, rpc: str, metadata: Iterable[Any]) -> RequestSpan:
        """The request's span, started now and ended by its `end`: for a call whose answer
        outlives the handler (an HTTP event stream). `metadata`: (key, value) pairs, gRPC
        metadata or HTTP headers (lower-case names), where `traceparent` names the parent."""
        if self._tracer is None:
            return RequestSpan(None)
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier = {key: _text(value) for key, value in metadata if key in TRACE_HEADERS}
        parent = TraceContextTextMapPropagator().extract(carrier)
        span = self._tracer.start_span(f"imagegen.{rpc}", context=parent, kind=SpanKind.SERVER)
        return RequestSpan(span)

    def record_run(self, request: Request, now: float, decoded: bool) -> None:
        """Adds the spans of what the request went through (times on the batcher's clock,
        `now` being the present): its wait, each step with its batch rows, and its decode."""
        if self._tracer is None:
            return
        to_ns = _wall_clock_ns(now)
        queue_end = request.started_at if request.started_at is not None else now
        self._closed_span("queue", to_ns(request.arrival), to_ns(queue_end), {})
        for began, ended, rows in request.step_log or ():
            attributes = {"imagegen.batch_rows": rows}
            self._closed_span("denoise step", to_ns(began), to_ns(ended), attributes)
        if decoded and request.step_log:
            self._closed_span("decode", to_ns(request.step_log[-1][1]), to_ns(now), {})

    @contextlib.contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[None]:
        """A child span of the current one for work done now (image encoding)."""
        if self._tracer is None:
            yield
            return
        with self._tracer.start_as_current_span(name, attributes=attributes):
            yield

    def _closed_span(self, name: str, start_ns: int, end_ns: int, attributes: Any) -> None:
        assert self._tracer is not None
        span = self._tracer.start_span(name, start_time=start_ns, attributes=attributes)
        span.end(end_time=max(start_ns, end_ns))


class RequestSpan:
    """A request's span (None when tracing is off): made current around the code that serves
    the request, ended once."""

    def __init__(self, span: Any) -> None:
        self._span = span

    @contextlib.contextmanager
    def current(self) -> Iterator[None]:
        """The span is the parent of the spans made inside (and of the tasks started inside)."""
        if self._span is None:
            yield
            return
        from opentelemetry.trace import use_span

        with use_span(self._span, end_on_exit=False):
            yield

    def end(self, rpc: str) -> None:
        """Ends the span, named after the RPC the request was served as (an HTTP request is
        known to be a stream only once its body is read)."""
        if self._span is not None and self._span.is_recording():
            self._span.update_name(f"imagegen.{rpc}")
            self._span.end()


def _exporter(name: str) -> Any:
    if name == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError as error:
            raise ValueError(
                "OTEL_TRACES_EXPORTER=otlp needs opentelemetry-exporter-otlp-proto-grpc"
            ) from error
        return OTLPSpanExporter()
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    raise ValueError(f"OTEL_TRACES_EXPORTER: {name!r} is not one of otlp, console, none")


def _wall_clock_ns(now: float) -> Any:
    """Converts the batcher's monotonic clock times to epoch nanoseconds, given `now` on it."""
    offset_ns = time.time_ns() - int(now * 1e9)
    return lambda t: int(t * 1e9) + offset_ns


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
