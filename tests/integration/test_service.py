"""The gRPC surface: statuses for bad input, stream events, health, reflection, info, metrics."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc
from imagegen_client import Completed, Queued, RetryPolicy, Started, Step
from PIL import Image
from support import ALL_ROWS, StreamWatcher

INVALID_FIELDS = [
    # (request fields, field named in the message, part of the allowed range in the message)
    ({"prompt": ""}, "prompt", "[1, 4000]"),
    ({"prompt": "x" * 4001}, "prompt", "[1, 4000]"),
    ({"prompt": "a" * 600}, "prompt", "at most 512"),  # tokens: one per byte in the tiny model
    ({"negative_prompt": "n" * 4001}, "negative_prompt", "[0, 4000]"),
    ({"width": 72}, "width", "multiples of 16"),
    ({"width": 16}, "width", "[32, 256]"),
    ({"height": 512}, "height", "[32, 256]"),
    ({"height": -16}, "height", "[32, 256]"),
    ({"num_inference_steps": 17}, "num_inference_steps", "[2, 16]"),
    ({"num_inference_steps": -1}, "num_inference_steps", "[2, 16]"),
    # Qwen-Image's terminal-stretched schedule is undefined for one step (0/0 in diffusers).
    ({"num_inference_steps": 1}, "num_inference_steps", "[2, 16]"),
    ({"num_images": 5}, "num_images", "[1, 4]"),
    ({"guidance_scale": 0.5}, "guidance_scale", "[1.0, 20.0]"),
    ({"guidance_scale": float("nan")}, "guidance_scale", "[1.0, 20.0]"),
    ({"seed": -1}, "seed", "[0, "),
    ({"output_format": 9}, "output_format", "OUTPUT_FORMAT_PNG"),
    ({"output_quality": 101}, "output_quality", "[1, 100]"),
    ({"priority": 4}, "priority", "[1, 3]"),
    ({"request_id": "bad id with spaces"}, "request_id", "[A-Za-z0-9._:-]"),
    ({"request_id": "abc\n"}, "request_id", "[A-Za-z0-9._:-]"),  # no line break in the logs
    ({"preview_every_n_steps": 9}, "preview_every_n_steps", "[1, 4]"),
    ({"adapters": [pb.AdapterRef(name="a", scale=1)] * 5}, "adapters", "at most 4"),
    ({"adapters": [pb.AdapterRef(name="a", scale=99)]}, "adapters[0].scale", "[-4.0, 4.0]"),
    ({"init_image": b"not an image"}, "init_image", ""),
]


@pytest.fixture(scope="module")
def stub(server: Any) -> Any:
    channel = grpc.insecure_channel(server.target)
    yield pb_grpc.ImageGenerationStub(channel)
    channel.close()


@pytest.mark.parametrize(
    "fields,field,allowed",
    INVALID_FIELDS,
    ids=[f[1] + str(i) for i, f in enumerate(INVALID_FIELDS)],
)
def test_every_invalid_field_gives_invalid_argument_naming_it(
    stub: Any, fields: dict[str, Any], field: str, allowed: str
) -> None:
    request = pb.GenerateRequest(**{"prompt": "ok", **fields})
    with pytest.raises(grpc.RpcError) as failure:
        if field == "preview_every_n_steps":  # only streams have previews
            list(stub.StreamProgress(request, timeout=30))
        else:
            stub.Generate(request, timeout=30)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = failure.value.details()
    assert details.startswith(f"{field}:"), details
    assert allowed in details, details


def test_an_unknown_adapter_gives_not_found(stub: Any) -> None:
    with pytest.raises(grpc.RpcError) as failure:
        stub.Generate(
            pb.GenerateRequest(prompt="ok", adapters=[pb.AdapterRef(name="nope")]), timeout=30
        )
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    assert "adapters[0].name" in failure.value.details()


def test_malformed_request_bytes_give_invalid_argument(server: Any) -> None:
    channel = grpc.insecure_channel(server.target)
    raw = channel.unary_unary("/imagegen.v1.ImageGeneration/Generate")
    with pytest.raises(grpc.RpcError) as failure:
        raw(b"\xff\xff\xff\xff garbage", timeout=30)
    channel.close()
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.value.details().startswith("request:")


def test_a_full_queue_answers_unavailable(server_factory: Any) -> None:
    server = server_factory(step_budget=0, max_queue_size=2)
    client = server.client(retry=RetryPolicy(max_attempts=1))
    watchers = [StreamWatcher(client, f"queued {i}", seed=i) for i in range(2)]
    for watcher in watchers:
        watcher.queued()
    with pytest.raises(grpc.RpcError) as failure:
        client.generate("one too many", seed=9)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "queue full" in failure.value.details()
    server.batcher.set_step_budget(None)
    for watcher in watchers:
        watcher.completed()


def test_a_request_cancelled_while_queued_never_reaches_the_engine(server_factory: Any) -> None:
    server = server_factory(step_budget=0, **ALL_ROWS)
    client = server.client()
    started_before = server.metrics()["imagegen_request_queue_seconds_count"]
    cancelled = client.stream("never runs", seed=1)
    assert isinstance(next(cancelled), Queued)
    cancelled.close()
    blocker = StreamWatcher(client, "runs", seed=2)
    blocker.queued()
    server.batcher.set_step_budget(None)
    assert blocker.completed().result.batch_size == 1  # the cancelled one did not share its batch
    metrics = server.metrics()
    assert metrics["imagegen_request_queue_seconds_count"] == started_before + 1
    assert (
        metrics['imagegen_requests_total{code="CANCELLED",protocol="grpc",rpc="StreamProgress"}']
        == 1
    )


def test_stream_sends_queued_started_every_step_then_completed(server: Any) -> None:
    events = list(server.client().stream("a stream", seed=5, steps=6, preview_every_n_steps=2))
    kinds = [type(event) for event in events]
    assert kinds[0] is Queued
    assert kinds[1] is Started
    steps = [event for event in events if isinstance(event, Step)]
    assert [step.step for step in steps] == [1, 2, 3, 4, 5, 6]
    assert {step.total_steps for step in steps} == {6}
    assert kinds[-1] is Completed and kinds.count(Completed) == 1
    assert kinds.index(Started) < kinds.index(Step)
    with_previews = [step.step for step in steps if step.previews]
    assert with_previews == [2, 4]  # the last step's "preview" is the image itself
    preview = steps[1].previews[0]
    decoded = Image.open(__import__("io").BytesIO(preview.data))
    assert decoded.format == "JPEG" and decoded.size == (preview.width, preview.height) == (8, 8)
    assert preview.mime_type == "image/jpeg"


def test_queued_events_report_position_and_estimated_start(server_factory: Any) -> None:
    server = server_factory(step_budget=0, max_batch_size=1, max_num_images=1, max_active_batches=1)
    client = server.client()
    first = StreamWatcher(client, "first", seed=1, steps=4)
    assert first.queued().position == 0
    second = StreamWatcher(client, "second", seed=2, steps=4)
    assert second.queued().position == 1
    server.batcher.set_step_budget(None)
    # Once `first` runs, `second` is next, and its start estimate comes from measured step times.
    update = second.wait_for(lambda e: isinstance(e, Queued) and e.position == 0)
    assert isinstance(update, Queued) and update.estimated_start_s > 0
    first.completed()
    second.completed()


def test_health_turns_serving_only_after_the_warm_up_batch(server_factory: Any) -> None:
    server = server_factory(wait_ready=False, step_budget=0)  # holds the warm-up batch
    channel = grpc.insecure_channel(server.target)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "imagegen.v1.ImageGeneration"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as failure:
        server.client(retry=RetryPolicy(max_attempts=1)).generate("too early")
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    watch = health.Watch(
        health_pb2.HealthCheckRequest(service="imagegen.v1.ImageGeneration"), timeout=60
    )
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    server.batcher.set_step_budget(None)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    metrics = server.metrics()
    assert metrics["imagegen_warmup_seconds"] > 0  # the warm-up ran first...
    assert metrics["imagegen_batch_size_count"] == 0  # ...and is not a request's batch
    watch.cancel()
    channel.close()


def test_reflection_lists_the_services(server: Any) -> None:
    channel = grpc.insecure_channel(server.target)
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    response = next(stub.ServerReflectionInfo(iter([request]), timeout=10))
    names = {service.name for service in response.list_services_response.service}
    channel.close()
    assert {"imagegen.v1.ImageGeneration", "grpc.health.v1.Health"} <= names


def test_server_info_reports_model_limits_and_batching(server: Any) -> None:
    info = server.client().server_info()
    assert info.ready and info.device == "cpu" and info.dtype == "float32"
    assert info.limits.size_multiple == 16
    assert (info.limits.min_width, info.limits.max_width, info.limits.default_steps) == (32, 256, 4)
    assert info.batching.policy == "step" and info.batching.max_batch_size == 8
    assert info.batching.row_selection == "cost"  # the default, as the test settings keep it
    assert pb.OUTPUT_FORMAT_NPY in info.limits.output_formats
    assert info.limits.default_output_quality == 90  # the setting's default


def test_metrics_pass_promtool_and_count_requests(server: Any, promtool: Path) -> None:
    client = server.client()
    client.generate("counted", seed=1)
    with pytest.raises(grpc.RpcError):
        client.generate("bad", width=7)
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read()
    check = subprocess.run(
        [str(promtool), "check", "metrics"], input=text, capture_output=True, check=False
    )
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
    metrics = server.metrics()
    assert metrics['imagegen_requests_total{code="OK",protocol="grpc",rpc="Generate"}'] >= 1
    assert (
        metrics['imagegen_requests_total{code="INVALID_ARGUMENT",protocol="grpc",rpc="Generate"}']
        >= 1
    )
    assert metrics["imagegen_ready"] == 1
    for name in (
        "imagegen_images_generated_total",
        "imagegen_pending_requests",
        "imagegen_running_rows",
        'imagegen_stage_seconds_count{stage="denoise_step"}',
        'imagegen_stage_seconds_count{stage="vae_decode"}',
        'imagegen_stage_seconds_count{stage="text_encode"}',
        "imagegen_request_queue_seconds_count",
        "imagegen_request_compute_seconds_count",
        "imagegen_prompt_cache_hits_total",
        "imagegen_loaded_adapters",
    ):
        assert name in metrics, name


@pytest.fixture(scope="session")
def promtool() -> Path:
    found = shutil.which("promtool") or (Path(__file__).parents[2] / ".tools/bin/promtool")
    path = Path(found)
    assert path.exists(), "promtool missing: run scripts/install-tools.sh (make tools)"
    return path
