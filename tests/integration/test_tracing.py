"""OpenTelemetry spans of a request on a real server, over gRPC and over HTTP, read from the
SDK's in-memory exporter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import openai
from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc
from imagegen_server.api.tracing import Tracing
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support import start_server

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"


TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


def traced_server(tiny_model: Path, **overrides: Any) -> tuple[Any, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return start_server(tiny_model, tracing=Tracing(provider), **overrides), exporter


def test_the_span_tree_of_one_request_under_the_callers_traceparent(tiny_model: Path) -> None:
    server, exporter = traced_server(tiny_model, max_batch_size=4)
    try:
        with grpc.insecure_channel(server.target) as channel:
            pb_grpc.ImageGenerationStub(channel).Generate(
                pb.GenerateRequest(prompt="traced", num_images=2, num_inference_steps=3),
                metadata=(("traceparent", TRACEPARENT),),
            )
    finally:
        server.stop()
    check_span_tree(exporter, "imagegen.Generate")


def test_an_http_request_takes_its_parent_from_the_traceparent_header(tiny_model: Path) -> None:
    server, exporter = traced_server(tiny_model, max_batch_size=4, http_port=0)
    api = openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.server.http_port}/v1", api_key="-", max_retries=0
    )
    headers = {"traceparent": TRACEPARENT}
    steps = {"num_inference_steps": 3}
    try:
        api.images.generate(
            prompt="traced", n=2, size="64x64", extra_headers=headers, extra_body=steps
        )
        check_span_tree(exporter, "imagegen.Generate")
        exporter.clear()
        streamed = api.images.generate(
            prompt="traced", n=2, size="64x64", stream=True, extra_headers=headers, extra_body=steps
        )
        assert len(list(streamed)) == 2  # one completed event per image
    finally:
        server.stop()
    check_span_tree(exporter, "imagegen.StreamProgress")


def check_span_tree(exporter: InMemorySpanExporter, root_name: str) -> None:
    """One request of 2 images and 3 steps under TRACEPARENT: its span named `root_name`, and
    under it the queue, a span per step with its batch rows, decode and encode, in order."""
    spans = {span.name: span for span in exporter.get_finished_spans()}
    root = spans[root_name]
    assert f"{root.context.trace_id:032x}" == TRACE_ID
    assert root.parent is not None and f"{root.parent.span_id:016x}" == PARENT_ID
    steps = [s for s in exporter.get_finished_spans() if s.name == "denoise step"]
    assert len(steps) == 3 and {s.attributes["imagegen.batch_rows"] for s in steps} == {2}
    for name in ("queue", "decode", "encode"):
        assert spans[name].parent.span_id == root.context.span_id, name
    for span in [*steps, spans["queue"], spans["decode"]]:
        assert span.parent.span_id == root.context.span_id
        assert root.start_time <= span.start_time <= span.end_time <= root.end_time
    assert spans["queue"].end_time <= steps[0].start_time
    assert steps[-1].end_time <= spans["decode"].end_time


def test_tracing_is_off_without_the_otel_variables(monkeypatch: Any) -> None:
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    assert not Tracing.from_environment().enabled
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not Tracing.from_environment().enabled
    monkeypatch.setenv("OTEL_SDK_DISABLED", "false")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    assert Tracing.from_environment().enabled
