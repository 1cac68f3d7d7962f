"""Hostile input: every GenerateRequest field fuzzed, and raw bytes that are no protobuf at all.

Each fuzzed request is judged by an independent oracle (`request_oracle`, from the limits
GetServerInfo publishes): an invalid one must get INVALID_ARGUMENT whose message starts with an
invalid field's name, an unknown adapter NOT_FOUND, and a valid one OK with its images. Raw
bytes end with a status from the allowed set, and the server stays SERVING."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc
from PIL import Image
from request_oracle import RequestOracle

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
# Texts are short (at most 40 characters: 128 template tokens + 4 bytes a character fit the
# 512-token limits of the byte-level tiny tokenizer) or longer than MAX_TEXT_CHARS.
SHORT_TEXT = 40
MAX_TEXT_CHARS = 300
TEXT = st.one_of(
    st.text(max_size=SHORT_TEXT), st.text(min_size=500, max_size=700), st.just("a cat")
)


def _png(width: int, height: int, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), 128).save(buffer, format="PNG")
    return buffer.getvalue()


# Uploads: none, junk, a valid image of the output size or too tall; masks of its shape or not.
INIT_IMAGES = st.one_of(
    st.just(b""),
    st.binary(max_size=64),
    st.sampled_from([_png(64, 64, "RGB"), _png(48, 96, "RGB")]),
)
MASKS = st.one_of(
    st.just(b""), st.binary(max_size=16), st.sampled_from([_png(32, 32, "L"), _png(32, 64, "L")])
)

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
    init_image=INIT_IMAGES,
    strength=st.one_of(st.none(), FLOATS, st.floats(min_value=0.3, max_value=1.0)),
    mask_image=MASKS,
)


def mostly(valid: st.SearchStrategy[Any], *invalid: Any) -> st.SearchStrategy[Any]:
    """Nine draws in ten from `valid`, the rest from `invalid`."""
    return st.integers(0, 9).flatmap(lambda n: valid if n else st.sampled_from(invalid))


# Requests near the valid region, each field valid nine times in ten, so that a fair share of
# the fuzz must come back OK (of the fully random ones above almost none do): text-to-image,
# and edits with an init image (and a mask) that decodes.
NEAR_VALID_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "prompt": mostly(st.text(min_size=1, max_size=SHORT_TEXT), "", "a\x00b"),
    "negative_prompt": mostly(st.sampled_from(["", "blurry", "模糊"]), "x" * 400),
    "width": mostly(st.sampled_from([0, 32, 48, 64]), 80, 40),
    "height": mostly(st.sampled_from([0, 32, 48, 64]), 16, 63),
    "num_inference_steps": mostly(st.sampled_from([0, 2, 3]), 1, 4),
    "guidance_scale": mostly(st.one_of(st.none(), st.floats(1.0, 8.0, width=32)), -1.0, 1e9),
    "seed": mostly(st.one_of(st.none(), st.integers(0, 2**40)), -1),
    "num_images": mostly(st.sampled_from([0, 1, 2]), 3, -1),
    "output_format": mostly(st.sampled_from([0, 1, 2, 3, 4]), 7),
    "output_quality": mostly(st.integers(0, 100), 101, -5),
    "adapters": mostly(
        st.lists(st.builds(pb.AdapterRef, name=st.just("ink"), scale=st.floats(0, 1)), max_size=1),
        [pb.AdapterRef(name="nope")],
        [pb.AdapterRef(name="ink", scale=99.0)],
        [pb.AdapterRef(name="ink"), pb.AdapterRef(name="ink")],
    ),
    "priority": mostly(st.sampled_from([0, 1]), 2),
    "request_id": mostly(st.sampled_from(["", "req-1"]), "a b"),
    "preview_every_n_steps": mostly(st.sampled_from([0, 1]), 5),
}
near_valid_requests = st.one_of(
    st.builds(pb.GenerateRequest, **NEAR_VALID_FIELDS),
    st.builds(
        pb.GenerateRequest,
        init_image=st.just(_png(64, 64, "RGB")),
        mask_image=st.sampled_from([b"", _png(32, 32, "L")]),
        strength=mostly(st.one_of(st.none(), st.floats(0.3, 1.0)), 0.0, 2.0),
        **NEAR_VALID_FIELDS,
    ),
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
        max_prompt_chars=MAX_TEXT_CHARS,
        max_negative_prompt_chars=MAX_TEXT_CHARS,
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def channel(fuzz_server: Any) -> Any:
    with grpc.insecure_channel(fuzz_server.target) as channel:
        yield channel


@pytest.fixture(scope="module")
def oracle(channel: Any) -> RequestOracle:
    info = pb_grpc.ImageGenerationStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
    limits = info.limits
    # The premise of TEXT: a short text's tokens always fit.
    assert min(limits.max_prompt_tokens, limits.max_negative_prompt_tokens) >= 128 + 4 * SHORT_TEXT
    return RequestOracle(limits, {adapter.name for adapter in info.adapters})


def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(request=st.one_of(requests, near_valid_requests), streaming=st.booleans())
def test_every_fuzzed_request_gets_the_status_the_oracle_owes_it(
    channel: Any, oracle: RequestOracle, request: pb.GenerateRequest, streaming: bool
) -> None:
    stub = pb_grpc.ImageGenerationStub(channel)
    responses: list[Any] = []
    if streaming:
        code, details = status_of(
            lambda: responses.extend(stub.StreamProgress(request, timeout=60))
        )
    else:
        code, details = status_of(lambda: responses.append(stub.Generate(request, timeout=60)))
    verdict = oracle.judge(request, streaming)
    event(code.name)  # the mix of outcomes, in --hypothesis-show-statistics
    assert code in verdict.codes, (code, details, verdict)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert any(details.startswith(f"{name}: ") for name in verdict.invalid), (
            details,
            verdict.invalid,
        )
    elif code == grpc.StatusCode.NOT_FOUND:
        assert re.match(r"adapters\[\d+\]\.name: ", details), details
    elif code == grpc.StatusCode.OK:
        final = responses[-1].completed.response if streaming else responses[-1]
        assert len(final.images) == (request.num_images or 1)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(payload=st.binary(max_size=256))
def test_raw_bytes_never_crash_the_server(channel: Any, payload: bytes) -> None:
    for method in ("Generate", "GetServerInfo"):
        raw = channel.unary_unary(f"/imagegen.v1.ImageGeneration/{method}")
        code, _details = status_of(lambda r=raw: r(payload, timeout=60))
        assert code in ALLOWED, (method, code)


def test_the_server_is_still_serving_after_the_fuzzing(fuzz_server: Any) -> None:
    client = fuzz_server.client()
    assert client.health() == "SERVING"
    assert client.generate("a calm lake", seed=1).images
