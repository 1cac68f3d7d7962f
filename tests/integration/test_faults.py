"""Fault isolation: a request that breaks the model fails alone; the engine never takes the
server down with it, and if its thread dies nobody hangs."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from imagegen_client import OutputFormat, RetryPolicy
from imagegen_server.base.engine_api import EngineRequest
from imagegen_server.base.errors import EngineUnavailable
from imagegen_server.engine.engine import Engine
from imagegen_server.engine.model import load_model
from support import ALL_ROWS, StreamWatcher, assert_same_image, engine_params, pixels

NPY = OutputFormat.NPY
NO_RETRY = RetryPolicy(max_attempts=1)


def test_one_poisoned_request_in_a_batch_of_eight_fails_alone(server_factory: Any) -> None:
    server = server_factory(step_budget=0, fault_injection_request_marker="poison", **ALL_ROWS)
    client = server.client(retry=NO_RETRY)
    names = [f"ok-{i}" for i in range(7)] + ["poison-7"]
    watchers = [
        StreamWatcher(client, f"prompt {i}", seed=i, output_format=NPY, request_id=name)
        for i, name in enumerate(names)
    ]
    for watcher in watchers:
        watcher.queued()
    server.batcher.set_step_budget(None)
    poisoned = watchers[-1].error()
    assert poisoned.code() == grpc.StatusCode.INTERNAL
    assert poisoned.details() == "generation failed; see the server log"  # no internals leak
    for index, watcher in enumerate(watchers[:-1]):
        result = watcher.completed().result
        assert result.batch_size == 8  # it ran inside the batch with the poisoned row
        alone = client.generate(f"prompt {index}", seed=index, output_format=NPY)
        assert_same_image(pixels(result), pixels(alone))
    assert (
        server.metrics()[
            'imagegen_requests_total{code="INTERNAL",protocol="grpc",rpc="StreamProgress"}'
        ]
        == 1
    )
    assert client.health() == "SERVING"


@pytest.mark.parametrize("stage", ["text_encode", "vae_decode"])
def test_a_failing_encode_or_decode_fails_only_the_poisoned_request(
    server_factory: Any, stage: str
) -> None:
    """The requests admitted together share one text-encoder call, and rows that finish
    together one VAE decode: when it fails, the engine retries request by request (row by row
    for the decode), so only the poisoned request fails, a two-image request among the others
    included, and every other image equals its image alone."""
    server = server_factory(
        step_budget=0,
        fault_injection_request_marker="poison",
        fault_injection_stage=stage,
        **ALL_ROWS,
    )
    client = server.client(retry=NO_RETRY)
    asks = [("ok-0", 1), ("ok-1", 2), ("poison-2", 1), ("ok-3", 1)]
    watchers = [
        StreamWatcher(
            client, f"prompt {i}", seed=i, output_format=NPY, request_id=name, num_images=images
        )
        for i, (name, images) in enumerate(asks)
    ]
    for watcher in watchers:
        watcher.queued()
    server.batcher.set_step_budget(None)
    poisoned = watchers[2].error()
    assert poisoned.code() == grpc.StatusCode.INTERNAL
    assert poisoned.details() == "generation failed; see the server log"
    for index, (name, images) in enumerate(asks):
        if name.startswith("poison"):
            continue
        result = watchers[index].completed().result
        alone = client.generate(f"prompt {index}", seed=index, output_format=NPY, num_images=images)
        assert len(result.images) == images
        for image in range(images):
            assert_same_image(pixels(result, image), pixels(alone, image))
    assert client.health() == "SERVING"


def test_a_failing_init_image_encode_fails_only_the_poisoned_edit(server_factory: Any) -> None:
    """The init images of edits admitted together share one VAE encode call."""
    from PIL import Image
    from support import png

    server = server_factory(
        step_budget=0,
        fault_injection_request_marker="poison",
        fault_injection_stage="image_encode",
        **ALL_ROWS,
    )
    client = server.client(retry=NO_RETRY)
    init = png(Image.radial_gradient("L").resize((64, 64)).convert("RGB"))
    edit = {"init_image": init, "strength": 0.75, "steps": 4, "output_format": NPY}
    asks = [("edit-0", edit), ("poison-1", edit), ("text-2", {"output_format": NPY})]
    watchers = [
        StreamWatcher(client, f"prompt {i}", seed=i, request_id=name, **options)
        for i, (name, options) in enumerate(asks)
    ]
    for watcher in watchers:
        watcher.queued()
    server.batcher.set_step_budget(None)
    assert watchers[1].error().code() == grpc.StatusCode.INTERNAL
    for index in (0, 2):
        result = watchers[index].completed().result
        alone = client.generate(f"prompt {index}", seed=index, **asks[index][1])
        assert_same_image(pixels(result), pixels(alone))
    assert client.health() == "SERVING"


def test_out_of_memory_halves_the_batch_and_caps_the_key(server_factory: Any) -> None:
    server = server_factory(step_budget=0, fault_injection_oom_rows=3, **ALL_ROWS)
    client = server.client(retry=NO_RETRY)
    watchers = [StreamWatcher(client, f"prompt {i}", seed=i, output_format=NPY) for i in range(8)]
    for watcher in watchers:
        watcher.queued()
    server.batcher.set_step_budget(None)
    results = [watcher.completed().result for watcher in watchers]  # 8 -> 4 -> 2 + 2: all succeed
    assert {result.batch_size for result in results} == {8}
    assert_same_image(
        pixels(results[5]), pixels(client.generate("prompt 5", seed=5, output_format=NPY))
    )
    # The key is now capped at the 2 rows that fit: a new wave runs in batches of 2.
    server.batcher.set_step_budget(0)
    wave = [StreamWatcher(client, f"again {i}", seed=i) for i in range(4)]
    for watcher in wave:
        watcher.queued()
    server.batcher.set_step_budget(None)
    assert {watcher.completed().result.batch_size for watcher in wave} == {2}


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Engine:
    return Engine(load_model(str(tiny_model)), prompt_cache_size=8, max_prompt_tokens=512)


def test_a_row_whose_values_go_non_finite_fails_alone(engine: Engine) -> None:
    engine.add("batch", [EngineRequest(f"r{i}", engine_params(f"r{i}", i)) for i in range(4)])
    engine.step("batch")
    with torch.inference_mode():  # what a numerical blow-up leaves behind
        engine._batches["batch"].latents[2, 0, 0] = float("nan")
    failed, finished = [], {}
    while engine.has_work():
        result = engine.step("batch")
        failed += result.failed
        finished.update({f.request_id: f.images[0].pixels for f in result.finished})
    assert failed == ["r2"] and sorted(finished) == ["r0", "r1", "r3"]
    alone = engine.run_to_completion(EngineRequest("solo", engine_params("solo", 1)))
    assert_same_image(finished["r1"], alone.images[0].pixels)
    assert torch.isfinite(torch.as_tensor(finished["r3"])).all()


def test_a_dead_engine_thread_fails_waiting_requests_and_turns_not_serving(
    server_factory: Any,
) -> None:
    server = server_factory(step_budget=0)
    client = server.client(retry=NO_RETRY)
    waiting = [StreamWatcher(client, f"waits {i}", seed=i) for i in range(2)]
    for watcher in waiting:
        watcher.queued()

    def die(engine: Any) -> None:
        raise SystemExit("the engine thread dies (what no exception handler may swallow)")

    answer = server.run(_call_on_engine(server, die), timeout=30)
    assert isinstance(answer, EngineUnavailable), answer  # its caller is answered, not left
    assert "SystemExit" in str(answer)
    for watcher in waiting:
        assert watcher.error().code() == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(server.target) as channel:
        status = (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(), timeout=10)
            .status
        )
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as refused:
        client.generate("after death")
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "engine failed" in refused.value.details()
    assert server.metrics()["imagegen_ready"] == 0


async def _call_on_engine(server: Any, command: Any) -> BaseException | None:
    try:
        await server.batcher.call_on_engine(command)
    except BaseException as error:  # the command's own end, reported to its caller
        return error
    return None


def test_a_drain_during_start_up_never_reports_the_server_ready(server_factory: Any) -> None:
    server = server_factory(wait_ready=False, step_budget=0)  # held in its warm-up
    assert server.run(server.server.drain(5))  # nothing was accepted: drained cleanly
    server.batcher.stop(timeout_s=60)
    assert not server.batcher.engine_running  # the engine thread has ended...
    server.run(asyncio.sleep(0))  # ...and what it left for the event loop has run
    assert server.metrics()["imagegen_ready"] == 0


def test_requests_left_at_the_drain_timeout_are_answered_then_not_after_the_flush(
    server_factory: Any,
) -> None:
    """The engine is held, so the accepted request cannot finish within the drain's timeout: it
    gets the drain's UNAVAILABLE, not gRPC's cancellation after the RPC flush grace."""
    server = server_factory(step_budget=0)
    watcher = StreamWatcher(server.client(retry=NO_RETRY), "left running", steps=4)
    watcher.queued()
    assert not server.run(server.server.drain(0.5))  # False: requests were left
    error = watcher.error()
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details() == "drain timeout (0.5s) passed; retry on another replica"
