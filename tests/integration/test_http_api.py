"""The OpenAI-compatible HTTP API, driven by the real `openai` SDK against a real server on
loopback: the same batcher, images and statuses as gRPC."""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import test_security
from imagegen_client import OutputFormat
from PIL import Image
from support import EVENT_TIMEOUT_S, StreamWatcher
from test_security import CLIENT_TOKEN, Pki

# The gRPC security tests' tokens and certificates serve the HTTP port here.
pki, tokens = test_security.pki, test_security.tokens
PROMPT = "a lighthouse at dusk"
# What each comparison asks for, in each protocol's words.
HTTP_OPTIONS: dict[str, Any] = {"size": "64x64", "output_format": "png"}
EXTRA = {"seed": 7, "num_inference_steps": 4}
GRPC_OPTIONS: dict[str, Any] = {
    "width": 64,
    "height": 64,
    "steps": 4,
    "seed": 7,
    "output_format": OutputFormat.PNG,
}


@pytest.fixture(scope="module")
def http_server(tiny_model: Path, tokens: Path) -> Any:
    from support import start_server

    running = start_server(tiny_model, http_port=0, auth_tokens_file=str(tokens))
    yield running
    running.stop()


def sdk(server: Any, token: str = CLIENT_TOKEN) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.server.http_port}/v1",
        api_key=token,
        max_retries=0,
        timeout=EVENT_TIMEOUT_S,
    )


def decoded(b64: str | None) -> np.ndarray:
    assert b64 is not None
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Waits for a state the server reaches on its own (a request queued, a drain begun)."""
    deadline = time.monotonic() + EVENT_TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_generate_returns_the_grpc_images_pixel_for_pixel(http_server: Any) -> None:
    model = sdk(http_server).models.list().data[0].id
    result = sdk(http_server).images.generate(
        prompt=PROMPT,
        model=model,
        n=2,
        response_format="b64_json",
        extra_body=EXTRA,
        **HTTP_OPTIONS,
    )
    reference = http_server.client(token=CLIENT_TOKEN).generate(
        PROMPT, num_images=2, **GRPC_OPTIONS
    )
    assert result.data is not None and len(result.data) == 2
    assert result.size == "64x64" and result.output_format == "png"
    for image, expected in zip(result.data, reference.images, strict=True):
        assert np.array_equal(decoded(image.b64_json), np.asarray(expected.to_pil()))
        assert image.model_extra == {"seed": expected.seed}
    assert [image.seed for image in reference.images] == [7, 8]
    metrics = http_server.metrics()
    assert metrics['imagegen_requests_total{code="OK",protocol="http",rpc="Generate"}'] >= 1
    assert metrics['imagegen_requests_total{code="OK",protocol="grpc",rpc="Generate"}'] >= 1


def test_streaming_sends_partial_images_then_the_unary_image(http_server: Any) -> None:
    stream = sdk(http_server).images.generate(
        prompt=PROMPT, stream=True, partial_images=2, extra_body=EXTRA, **HTTP_OPTIONS
    )
    events = list(stream)
    assert [event.type for event in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    assert [getattr(event, "partial_image_index", None) for event in events[:2]] == [0, 1]
    for partial in events[:2]:
        assert partial.output_format == "jpeg" and decoded(partial.b64_json).ndim == 3
    unary = sdk(http_server).images.generate(prompt=PROMPT, extra_body=EXTRA, **HTTP_OPTIONS)
    assert unary.data is not None
    assert np.array_equal(decoded(events[-1].b64_json), decoded(unary.data[0].b64_json))
    with pytest.raises(openai.BadRequestError):  # refused before it streams: still a stream
        sdk(http_server).images.generate(prompt=PROMPT, stream=True, size="big")
    metrics = http_server.metrics()
    assert metrics['imagegen_requests_total{code="OK",protocol="http",rpc="StreamProgress"}'] >= 1
    refused = (
        'imagegen_requests_total{code="INVALID_ARGUMENT",protocol="http",rpc="StreamProgress"}'
    )
    assert metrics[refused] >= 1


def test_edit_with_an_image_and_a_mask_equals_grpc_inpainting(http_server: Any) -> None:
    y, x = np.mgrid[0:64, 0:64]
    picture = Image.fromarray(
        (np.stack([x / 64, y / 64, (x + y) / 128], axis=-1) * 255).astype(np.uint8)
    )
    # OpenAI's mask: transparent where to edit. The engine's: white where to edit.
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[16:48, 16:48] = 0
    openai_mask = Image.fromarray(np.dstack([np.zeros((64, 64, 3), np.uint8), alpha]), "RGBA")
    white_mask = Image.fromarray(255 - alpha, "L")
    result = sdk(http_server).images.edit(
        image=("picture.png", png(picture), "image/png"),
        mask=("mask.png", png(openai_mask), "image/png"),
        prompt=PROMPT,
        extra_body={**EXTRA, "strength": 0.75},
        **HTTP_OPTIONS,
    )
    reference = http_server.client(token=CLIENT_TOKEN).generate(
        PROMPT, init_image=png(picture), mask_image=png(white_mask), strength=0.75, **GRPC_OPTIONS
    )
    assert result.data is not None and len(result.data) == 1
    assert np.array_equal(
        decoded(result.data[0].b64_json), np.asarray(reference.images[0].to_pil())
    )
    streamed = list(
        sdk(http_server).images.edit(
            image=("picture.png", png(picture), "image/png"),
            mask=("mask.png", png(openai_mask), "image/png"),
            prompt=PROMPT,
            stream=True,
            partial_images=1,
            extra_body={**EXTRA, "strength": 0.75},
            **HTTP_OPTIONS,
        )
    )
    assert [event.type for event in streamed] == [
        "image_edit.partial_image",
        "image_edit.completed",
    ]
    assert np.array_equal(decoded(streamed[-1].b64_json), decoded(result.data[0].b64_json))


@pytest.mark.parametrize(
    "options,param",
    [
        ({"size": "100x64"}, "size"),
        ({"size": "big"}, "size"),
        ({"response_format": "url"}, "response_format"),
        ({"n": 0}, "n"),
        ({"extra_body": {"num_inference_steps": 99}}, "num_inference_steps"),
    ],
)
def test_bad_fields_are_400_naming_the_field(
    http_server: Any, options: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as failure:
        sdk(http_server).images.generate(prompt=PROMPT, **options)
    assert failure.value.status_code == 400
    body = failure.value.body
    assert isinstance(body, dict)
    assert body["param"] == param and body["type"] == "invalid_request_error"
    assert body["code"] == "invalid_argument" and body["message"]


def test_another_model_is_404_naming_model(http_server: Any) -> None:
    with pytest.raises(openai.NotFoundError) as failure:
        sdk(http_server).images.generate(prompt=PROMPT, model="dall-e-3")
    assert failure.value.status_code == 404
    assert isinstance(failure.value.body, dict) and failure.value.body["param"] == "model"


def test_a_bad_token_is_401_with_openai_error_body(http_server: Any) -> None:
    with pytest.raises(openai.AuthenticationError) as failure:
        sdk(http_server, token="not-a-known-token-at-all").images.generate(prompt=PROMPT)
    assert failure.value.status_code == 401
    body = failure.value.body
    assert isinstance(body, dict)
    assert body["type"] == "authentication_error" and body["code"] == "unauthenticated"
    metrics = http_server.metrics()
    assert metrics['imagegen_requests_total{code="UNAUTHENTICATED",protocol="http",rpc="Generate"}']


def test_a_body_over_the_limit_is_413_before_it_is_read(server_factory: Any) -> None:
    server = server_factory(http_port=0, max_request_bytes=4096)
    with pytest.raises(openai.APIStatusError) as failure:
        sdk(server).images.generate(prompt="x" * 8192)
    assert failure.value.status_code == 413
    assert isinstance(failure.value.body, dict)
    assert failure.value.body["code"] == "resource_exhausted"
    # Without a Content-Length (chunked), refused once the bytes received pass the limit.
    connection = http.client.HTTPConnection("127.0.0.1", server.server.http_port)
    chunks = (b'{"prompt": "' if i == 0 else b"x" * 1024 for i in range(8))
    connection.request("POST", "/v1/images/generations", chunks, encode_chunked=True)
    response = connection.getresponse()
    assert response.status == 413
    assert json.loads(response.read())["error"]["code"] == "resource_exhausted"
    connection.close()


def test_a_full_queue_is_503_and_a_rate_limit_429_with_retry_after(server_factory: Any) -> None:
    server = server_factory(http_port=0, step_budget=0, max_queue_size=1)
    holder = StreamWatcher(server.client(), "holds the only queue slot", steps=2)
    holder.queued()  # the engine is held: it stays queued
    with pytest.raises(openai.InternalServerError) as failure:
        sdk(server).images.generate(prompt=PROMPT)
    assert failure.value.status_code == 503
    assert isinstance(failure.value.body, dict)
    assert failure.value.body["code"] == "unavailable"
    assert "queue" in failure.value.body["message"]
    server.batcher.set_step_budget(None)
    holder.completed()

    limited = server_factory(http_port=0, rate_limit_rps=0.01, rate_limit_burst=1)
    sdk(limited).images.generate(prompt=PROMPT, extra_body={"num_inference_steps": 2})
    with pytest.raises(openai.RateLimitError) as failure:
        sdk(limited).images.generate(prompt=PROMPT)
    assert failure.value.status_code == 429
    assert int(failure.value.response.headers["retry-after"]) >= 1


def test_the_drain_finishes_http_requests_in_flight_and_refuses_new_ones(
    server_factory: Any,
) -> None:
    server = server_factory(http_port=0, step_budget=0)
    results: list[Any] = []
    in_flight = threading.Thread(
        target=lambda: results.append(
            sdk(server).images.generate(prompt=PROMPT, extra_body=EXTRA, **HTTP_OPTIONS)
        ),
        daemon=True,
    )
    in_flight.start()
    wait_until(lambda: server.metrics()["imagegen_pending_requests"] == 1, "the request queued")
    drain = asyncio.run_coroutine_threadsafe(server.server.drain(60), server.loop)
    wait_until(lambda: not server.batcher.ready, "the drain to begin")
    with pytest.raises(openai.InternalServerError) as failure:
        sdk(server).images.generate(prompt=PROMPT)
    assert failure.value.status_code == 503
    server.batcher.set_step_budget(None)
    assert drain.result(EVENT_TIMEOUT_S) is True
    in_flight.join(EVENT_TIMEOUT_S)
    assert len(results) == 1 and results[0].data is not None and len(results[0].data) == 1
    with pytest.raises(openai.APIConnectionError):
        sdk(server).models.list()


@pytest.mark.parametrize("stream,rpc", [(False, "Generate"), (True, "StreamProgress")])
def test_a_client_that_disconnects_drops_its_queued_request(
    server_factory: Any, stream: bool, rpc: str
) -> None:
    server = server_factory(http_port=0, step_budget=0)  # held: the request stays queued
    connection = http.client.HTTPConnection("127.0.0.1", server.server.http_port)
    body = json.dumps({"prompt": PROMPT, "stream": stream})
    connection.request("POST", "/v1/images/generations", body, {"Content-Type": "application/json"})
    wait_until(lambda: server.metrics()["imagegen_pending_requests"] == 1, "the request queued")
    connection.close()
    cancelled = f'imagegen_requests_total{{code="CANCELLED",protocol="http",rpc="{rpc}"}}'
    wait_until(lambda: server.metrics().get(cancelled) == 1, "the request counted CANCELLED")
    assert server.metrics()["imagegen_pending_requests"] == 0  # it left the queue


def test_the_http_port_serves_the_grpc_ports_mutual_tls(server_factory: Any, pki: Pki) -> None:
    server = server_factory(
        http_port=0,
        tls_cert_file=str(pki.server_cert),
        tls_key_file=str(pki.server_key),
        tls_client_ca_file=str(pki.ca),
    )

    def https(cert: Path | None) -> openai.OpenAI:
        context = ssl.create_default_context(cafile=str(pki.ca))
        if cert is not None:
            context.load_cert_chain(str(cert), str(cert.with_suffix(".key")))
        return openai.OpenAI(
            base_url=f"https://localhost:{server.server.http_port}/v1",
            api_key="unused",
            max_retries=0,
            http_client=openai.DefaultHttpx2Client(verify=context),
        )

    assert https(pki.client_cert).models.list().data[0].object == "model"
    for refused in (https(None), https(pki.stranger_cert), sdk(server)):  # sdk: plaintext
        with pytest.raises(openai.APIConnectionError):
            refused.models.list()


def test_an_idempotency_key_over_http_runs_the_engine_once_and_replays_the_bytes(
    server_factory: Any,
) -> None:
    server = server_factory(http_port=0, step_budget=0)  # held: both calls meet in flight
    keyed = {"Idempotency-Key": "http-key-1"}
    results: list[Any] = []

    def call() -> None:
        results.append(
            sdk(server).images.generate(
                prompt=PROMPT, extra_body=EXTRA, extra_headers=keyed, **HTTP_OPTIONS
            )
        )

    callers = [threading.Thread(target=call, daemon=True) for _ in range(2)]
    callers[0].start()
    wait_until(lambda: server.metrics()["imagegen_pending_requests"] == 1, "the first queued")
    callers[1].start()
    joined = 'imagegen_idempotency_lookups_total{outcome="joined"}'
    wait_until(lambda: server.metrics().get(joined) == 1, "the repeat joined the first")
    server.batcher.set_step_budget(None)
    for caller in callers:
        caller.join(EVENT_TIMEOUT_S)
        assert not caller.is_alive()
    replay = sdk(server).images.generate(
        prompt=PROMPT, extra_body=EXTRA, extra_headers=keyed, **HTTP_OPTIONS
    )
    assert server.metrics()["imagegen_request_compute_seconds_count"] == 1  # one engine run
    images = [result.data[0].b64_json for result in [*results, replay]]
    assert len(images) == 3 and images[0] is not None and len(set(images)) == 1
    with pytest.raises(openai.ConflictError) as conflict:  # the same key, another body
        sdk(server).images.generate(prompt="another prompt", extra_headers=keyed, **HTTP_OPTIONS)
    assert isinstance(conflict.value.body, dict)
    assert conflict.value.body["param"] == "idempotency_key"


def test_delete_cancels_a_queued_http_request_by_the_id_it_reported(server_factory: Any) -> None:
    server = server_factory(http_port=0, step_budget=0)  # held: the request stays queued
    failures: list[Exception] = []

    def call() -> None:
        try:
            sdk(server).images.generate(
                prompt=PROMPT, extra_headers={"X-Request-Id": "cancel-me"}, **HTTP_OPTIONS
            )
        except openai.APIStatusError as error:
            failures.append(error)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    wait_until(lambda: server.metrics()["imagegen_pending_requests"] == 1, "the request queued")
    for expected_status, expected in ((200, "queued"), (404, "not_found")):
        connection = http.client.HTTPConnection("127.0.0.1", server.server.http_port)
        connection.request("DELETE", "/v1/requests/cancel-me")
        response = connection.getresponse()
        body = json.loads(response.read())
        connection.close()
        assert response.status == expected_status, body
        assert body.get("state", body.get("error", {}).get("code")) == expected, body
    caller.join(EVENT_TIMEOUT_S)
    assert not caller.is_alive()
    assert len(failures) == 1 and failures[0].status_code == 499


def test_unknown_routes_and_cancel_by_id_answer_in_openai_error_bodies(http_server: Any) -> None:
    port = http_server.server.http_port
    for method, path, status, code in (
        ("GET", "/v1/images/variations", 404, "unknown_route"),
        ("GET", "/v1/images/generations", 405, "unknown_route"),
        ("DELETE", "/v1/requests/some-id", 404, "not_found"),
    ):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=EVENT_TIMEOUT_S)
        connection.request(method, path, headers={"Authorization": f"Bearer {CLIENT_TOKEN}"})
        response = connection.getresponse()
        body = json.loads(response.read())
        connection.close()
        assert (response.status, body["error"]["code"]) == (status, code), (path, body)


def test_a_request_that_breaks_the_model_fails_alone_in_an_error_event(
    server_factory: Any,
) -> None:
    server = server_factory(http_port=0, fault_injection_request_marker="poison")
    poisoned = {"X-Request-Id": "poison-1"}
    with pytest.raises(openai.APIError) as failure:
        list(
            sdk(server).images.generate(
                prompt=PROMPT, stream=True, partial_images=1, extra_headers=poisoned
            )
        )
    assert failure.value.body == {
        "message": "generation failed; see the server log",
        "type": "server_error",
        "param": None,
        "code": "internal",
    }
    with pytest.raises(openai.InternalServerError) as unary:
        sdk(server).images.generate(prompt=PROMPT, extra_headers=poisoned)
    assert unary.value.status_code == 500
    answered = sdk(server).images.with_raw_response.generate(
        prompt=PROMPT, extra_headers={"X-Request-Id": "fine-2"}
    )
    assert answered.headers["x-request-id"] == "fine-2"
    metrics = server.metrics()
    assert metrics['imagegen_requests_total{code="INTERNAL",protocol="http",rpc="StreamProgress"}']
    assert metrics['imagegen_requests_total{code="INTERNAL",protocol="http",rpc="Generate"}']
