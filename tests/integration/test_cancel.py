"""Cancel by id: CancelGeneration from any connection of the same caller (admin: any caller's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from imagegen_client import OutputFormat, RetryPolicy
from support import StreamWatcher, assert_same_image, pixels

NO_RETRY = RetryPolicy(max_attempts=1)
ALICE = "client-alice-0123456789abcdef"
BOB = "client-bob-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"


@pytest.fixture(scope="module")
def cancel_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from support import start_server

    tokens = tmp_path_factory.mktemp("cancel-auth") / "tokens"
    tokens.write_text(f"client:{ALICE}\nclient:{BOB}\nadmin:{ADMIN}\n")
    running = start_server(tiny_model, auth_tokens_file=str(tokens))
    yield running
    running.stop()


@pytest.fixture
def server(cancel_server: Any) -> Any:
    """The module's server, held at a step boundary; released to run freely afterwards."""
    cancel_server.batcher.set_step_budget(0)
    yield cancel_server
    cancel_server.batcher.set_step_budget(None)
    assert cancel_server.run(cancel_server.batcher.wait_idle(60))


def started_requests(server: Any) -> float:
    return server.metrics()["imagegen_request_queue_seconds_count"]


def test_cancel_by_key_from_a_second_channel_while_queued(server: Any) -> None:
    first_channel = server.client(token=ALICE)
    second_channel = server.client(token=ALICE, retry=NO_RETRY)
    started = started_requests(server)
    watcher = StreamWatcher(first_channel, "never runs", seed=1, idempotency_key="queued-1")
    watcher.queued()
    assert second_channel.cancel(idempotency_key="queued-1") == "queued"
    assert watcher.error().code() == grpc.StatusCode.CANCELLED
    server.batcher.set_step_budget(None)
    assert server.run(server.batcher.wait_idle(30))
    assert started_requests(server) == started  # it never reached the engine
    assert server.metrics()['imagegen_cancellations_total{state="queued"}'] >= 1


def test_cancel_by_request_id_while_running_leaves_its_batch_mates_unchanged(
    server: Any,
) -> None:
    first_channel = server.client(token=ALICE)
    second_channel = server.client(token=ALICE, retry=NO_RETRY)
    npy = {"output_format": OutputFormat.NPY, "steps": 4}
    victim = StreamWatcher(first_channel, "a fox", seed=1, request_id="victim", **npy)
    mate = StreamWatcher(first_channel, "an owl", seed=2, request_id="mate", **npy)
    victim.queued()
    mate.queued()
    server.batcher.set_step_budget(1)
    victim.step(1)
    mate.step(1)
    assert second_channel.cancel(request_id="victim") == "running"
    assert victim.error().code() == grpc.StatusCode.CANCELLED
    server.batcher.set_step_budget(None)
    shared = mate.completed().result
    assert shared.batch_size == 2  # they did share a batch until the cancel
    alone = first_channel.generate("an owl", seed=2, **npy)
    assert alone.batch_size == 1
    assert_same_image(pixels(shared), pixels(alone))


def test_a_caller_cannot_cancel_another_callers_request_but_an_admin_can(server: Any) -> None:
    alice = server.client(token=ALICE)
    bob = server.client(token=BOB, retry=NO_RETRY)
    admin = server.client(token=ADMIN, retry=NO_RETRY)
    watcher = StreamWatcher(alice, "alice's", seed=3, idempotency_key="mine", request_id="r-1")
    watcher.queued()
    for target in ({"idempotency_key": "mine"}, {"request_id": "r-1"}):
        with pytest.raises(grpc.RpcError) as refused:
            bob.cancel(**target)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert next(iter(target)) in refused.value.details()
    assert admin.cancel(request_id="r-1") == "queued"
    assert watcher.error().code() == grpc.StatusCode.CANCELLED


def test_an_unknown_id_is_not_found_naming_the_field(server: Any) -> None:
    alice = server.client(token=ALICE, retry=NO_RETRY)
    for target in ({"idempotency_key": "nothing"}, {"request_id": "nothing"}):
        with pytest.raises(grpc.RpcError) as missing:
            alice.cancel(**target)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert next(iter(target)) in missing.value.details()


def test_a_finished_keyed_request_cannot_be_cancelled(server: Any) -> None:
    alice = server.client(token=ALICE, retry=NO_RETRY)
    server.batcher.set_step_budget(None)
    alice.generate("done", seed=4, idempotency_key="finished")
    with pytest.raises(grpc.RpcError) as late:
        alice.cancel(idempotency_key="finished")
    assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already finished" in late.value.details()


def test_the_async_client_cancels_and_repeats_with_a_key_too(server: Any) -> None:
    import asyncio

    from imagegen_client import AsyncImageGenClient

    watcher = StreamWatcher(server.client(token=ALICE), "async", seed=5, idempotency_key="async")
    watcher.queued()

    async def cancel() -> str:
        async with AsyncImageGenClient(server.target, token=ALICE) as client:
            return await client.cancel(idempotency_key="async")

    assert asyncio.run(cancel()) == "queued"
    assert watcher.error().code() == grpc.StatusCode.CANCELLED
    server.batcher.set_step_budget(None)

    async def twice() -> tuple[Any, Any]:
        async with AsyncImageGenClient(server.target, token=ALICE) as client:
            first = await client.generate("async", seed=5, idempotency_key="async")
            return first, await client.generate("async", seed=5, idempotency_key="async")

    first, repeat = asyncio.run(twice())  # a cancelled key is free again: it runs anew
    assert [image.data for image in first.images] == [image.data for image in repeat.images]
