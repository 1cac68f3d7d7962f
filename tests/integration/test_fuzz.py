"""Hostile input: every GenerateRequest field fuzzed, and raw bytes that are no protobuf at all.
Every call ends with a status from the allowed set, and the server stays SERVING."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
SMALL = st.one_of(st.integers(min_value=-3, max_value=80), INT32)
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)
TEXT = st.one_of(st.text(max_size=40), st.text(min_size=500, max_size=700), st.just("a cat"))

requests = st.builds(
    pb.GenerateRequest,
    prompt=TEXT,
    negative_prompt=TEXT,
    width=st.one_of(st.sampled_from([0, 16, 32, 48, 64, 65]), SMALL),
    height=st.one_of(st.sampled_from([0, 16, 32, 48, 64, 65]), SMALL),
    num_inference_steps=SMALL,
    guidance_scale=st.one_of(st.none(), FLOATS),
    seed=st.one_of(st.none(), st.integers(min_value=-(2**63), max_value=2**63 - 1)),
    num_images=SMALL,
    output_format=st.integers(min_value=-2, max_value=8),
    output_quality=SMALL,
    adapters=st.lists(
        st.builds(
            pb.AdapterRef,
            name=st.sampled_from(["ink", "../x", "", "nope"]),
            scale=st.one_of(st.none(), FLOATS),
        ),
        max_size=6,
    ),
    priority=SMALL,
    request_id=st.one_of(st.just(""), st.text(max_size=200)),
    preview_every_n_steps=SMALL,
    init_image=st.one_of(st.just(b""), st.binary(max_size=64)),
    strength=st.one_of(st.none(), FLOATS),
    mask_image=st.one_of(st.just(b""), st.binary(max_size=16)),
)


@pytest.fixture(scope="module")
def fuzz_server(tiny_model: Path) -> Any:
    from support import start_server

    # Tight limits so valid requests are cheap: at most 64x64, 3 steps, 2 images.
    running = start_server(
        tiny_model,
        max_width=64,
        max_height=64,
        default_steps=2,
        max_steps=3,
        max_num_images=2,
        adapter_dir=str(tiny_model / "adapters"),
        preload_adapters=["ink"],
        max_queue_size=16,
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def channel(fuzz_server: Any) -> Any:
    with grpc.insecure_channel(fuzz_server.target) as channel:
        yield channel


def status_of(call: Any) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(request=requests, streaming=st.booleans())
def test_every_fuzzed_request_ends_with_an_allowed_status(
    channel: Any, request: pb.GenerateRequest, streaming: bool
) -> None:
    stub = pb_grpc.ImageGenerationStub(channel)
    if streaming:
        code = status_of(lambda: list(stub.StreamProgress(request, timeout=60)))
    else:
        code = status_of(lambda: stub.Generate(request, timeout=60))
    assert code in ALLOWED, code


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(payload=st.binary(max_size=256))
def test_raw_bytes_never_crash_the_server(channel: Any, payload: bytes) -> None:
    for method in ("Generate", "GetServerInfo"):
        raw = channel.unary_unary(f"/imagegen.v1.ImageGeneration/{method}")
        code = status_of(lambda r=raw: r(payload, timeout=60))
        assert code in ALLOWED, (method, code)


def test_the_server_is_still_serving_after_the_fuzzing(fuzz_server: Any) -> None:
    client = fuzz_server.client()
    assert client.health() == "SERVING"
    assert client.generate("a calm lake", seed=1).images
