"""OpenTelemetry spans of a request on a real server, read from the SDK's in-memory exporter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc
from imagegen_server.api.tracing import Tracing
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support import start_server

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"


def test_the_span_tree_of_one_request_under_the_callers_traceparent(tiny_model: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = start_server(tiny_model, tracing=Tracing(provider), max_batch_size=4)
    try:
        with grpc.insecure_channel(server.target) as channel:
            pb_grpc.ImageGenerationStub(channel).Generate(
                pb.GenerateRequest(prompt="traced", num_images=2, num_inference_steps=3),
                metadata=(("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),),
            )
    finally:
        server.stop()
    spans = {span.name: span for span in exporter.get_finished_spans()}
    root = spans["imagegen.Generate"]
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
