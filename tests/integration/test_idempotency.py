"""Safe retries: a request with an idempotency key joins its twin in flight, is answered from its
stored result within the window, and outlives its caller's disconnect."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from imagegen_client import OutputFormat, RetryPolicy, Step
from support import StreamWatcher

NO_RETRY = RetryPolicy(max_attempts=1)


def engine_runs(server: Any) -> float:
    """Requests the engine finished (one observation per request that ran its steps)."""
    return server.metrics().get("imagegen_request_compute_seconds_count", 0.0)


def lookups(server: Any, outcome: str) -> float:
    return server.metrics().get(f'imagegen_idempotency_lookups_total{{outcome="{outcome}"}}', 0.0)


class FakeClock:
    """The job table's clock, moved by the test: the window passes without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def image_bytes(result: Any) -> list[bytes]:
    return [image.data for image in result.images]


@pytest.fixture(scope="module")
def shared_server(tiny_model: Path) -> Iterator[Any]:
    from support import start_server

    running = start_server(tiny_model)
    yield running
    running.stop()


@pytest.fixture
def server(shared_server: Any) -> Iterator[Any]:
    """The module's server (default settings: a 600 s window); each test uses its own keys and
    leaves the engine running freely and the real clock in place."""
    yield shared_server
    shared_server.batcher.set_step_budget(None)
    shared_server.server.jobs.keyed.clock = time.monotonic
    assert shared_server.run(shared_server.batcher.wait_idle(60))


def test_two_concurrent_calls_with_one_key_run_the_engine_once(server: Any) -> None:
    server.batcher.set_step_budget(0)
    first_client, second_client = server.client(), server.client()
    runs_before, joined = engine_runs(server), lookups(server, "joined")
    options = {"seed": 5, "steps": 3, "idempotency_key": "twins"}
    first = StreamWatcher(first_client, "a lighthouse", **options)
    first.queued()
    second = StreamWatcher(second_client, "a lighthouse", **options)
    second.queued()  # joined: the queued job's state comes first
    server.batcher.set_step_budget(None)
    one, two = first.completed().result, second.completed().result
    assert image_bytes(one) == image_bytes(two)
    assert [event.step for event in second.seen if isinstance(event, Step)] == [1, 2, 3]
    assert engine_runs(server) == runs_before + 1
    assert lookups(server, "joined") == joined + 1


def test_a_repeat_after_completion_returns_identical_bytes_without_engine_work(
    server_factory: Any,
) -> None:
    server = server_factory()  # its own: the stored bytes are this test's alone
    client = server.client()
    first = client.generate("a lantern", seed=7, idempotency_key="lantern-1", request_id="a")
    runs = engine_runs(server)
    repeat = client.generate("a lantern", seed=7, idempotency_key="lantern-1", request_id="b")
    assert image_bytes(repeat) == image_bytes(first)
    assert repeat.request_id == "b"  # the correlation id is each call's own
    assert engine_runs(server) == runs
    assert lookups(server, "replayed") == 1
    stored = server.metrics()["imagegen_idempotency_bytes"]
    assert stored == sum(len(data) for data in image_bytes(first))


def test_a_different_body_under_the_same_key_is_refused(server: Any) -> None:
    client = server.client(retry=NO_RETRY)
    conflicts = lookups(server, "conflict")
    client.generate("a kite", seed=1, idempotency_key="kite")
    with pytest.raises(grpc.RpcError) as refused:
        client.generate("a kite", seed=2, idempotency_key="kite")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "idempotency_key" in refused.value.details()
    assert lookups(server, "conflict") == conflicts + 1


def test_a_malformed_key_is_invalid_argument(server: Any) -> None:
    client = server.client(retry=NO_RETRY)
    with pytest.raises(grpc.RpcError) as refused:
        client.generate("a kite", idempotency_key="has space")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "idempotency_key" in refused.value.details()


def test_the_window_expires(server: Any) -> None:
    clock = FakeClock()
    server.server.jobs.keyed.clock = clock
    client = server.client()
    expired = server.metrics().get('imagegen_idempotency_evictions_total{reason="expired"}', 0)
    first = client.generate("a mill", seed=3, idempotency_key="mill")
    runs = engine_runs(server)
    clock.now += 599.9  # the default window: 600 s
    assert image_bytes(client.generate("a mill", seed=3, idempotency_key="mill")) == (
        image_bytes(first)
    )
    assert engine_runs(server) == runs
    clock.now += 0.1  # the window (600 s after it finished) has passed: a new request
    again = client.generate("a mill", seed=3, idempotency_key="mill")
    assert engine_runs(server) == runs + 1
    assert image_bytes(again) == image_bytes(first)  # deterministic, but computed again
    metrics = server.metrics()
    assert metrics['imagegen_idempotency_evictions_total{reason="expired"}'] >= expired + 1


def test_a_late_repeat_of_an_evicted_key_says_so(server_factory: Any) -> None:
    server = server_factory(idempotency_max_entries=1)
    client = server.client(retry=NO_RETRY)
    client.generate("a barn", seed=1, idempotency_key="barn")
    client.generate("a silo", seed=2, idempotency_key="silo")  # evicts the barn (oldest)
    with pytest.raises(grpc.RpcError) as refused:
        client.generate("a barn", seed=1, idempotency_key="barn")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "idempotency_key" in refused.value.details()
    assert "evicted" in refused.value.details()
    metrics = server.metrics()
    assert metrics['imagegen_idempotency_evictions_total{reason="entries"}'] == 1
    assert metrics["imagegen_idempotency_entries"] == 1


def test_the_byte_bound_evicts_the_oldest_result(server_factory: Any) -> None:
    # NPY at 64x64 is 49 KiB an image: room for one result, not two.
    server = server_factory(idempotency_max_bytes=80_000)
    client = server.client(retry=NO_RETRY)
    npy = {"output_format": OutputFormat.NPY}
    client.generate("a barn", seed=1, idempotency_key="barn", **npy)
    silo = client.generate("a silo", seed=2, idempotency_key="silo", **npy)
    assert server.metrics()['imagegen_idempotency_evictions_total{reason="bytes"}'] == 1
    runs = engine_runs(server)
    repeat = client.generate("a silo", seed=2, idempotency_key="silo", **npy)
    assert image_bytes(repeat) == image_bytes(silo) and engine_runs(server) == runs
    with pytest.raises(grpc.RpcError) as refused:
        client.generate("a barn", seed=1, idempotency_key="barn", **npy)
    assert "evicted" in refused.value.details()


def test_keys_are_scoped_to_the_caller(server_factory: Any, tokens: Any) -> None:
    server = server_factory(auth_tokens_file=str(tokens))
    alice = server.client(token=CLIENT_TOKEN)
    admin = server.client(token=ADMIN_TOKEN)
    alice.generate("a fern", seed=1, idempotency_key="shared-key")
    runs = engine_runs(server)
    admin.generate("a moss", seed=2, idempotency_key="shared-key")  # no conflict: its own key
    assert engine_runs(server) == runs + 1


def test_a_keyed_request_runs_on_after_its_caller_disconnects(server: Any) -> None:
    server.batcher.set_step_budget(0)
    client = server.client()
    options = {"seed": 9, "steps": 4, "idempotency_key": "detached"}
    stream = client.stream("a harbour", **options)
    server.batcher.set_step_budget(1)
    for event in stream:
        if isinstance(event, Step):
            break
    stream.close()  # the client drops the call mid-stream
    runs = engine_runs(server)
    watcher = StreamWatcher(server.client(), "a harbour", **options)
    watcher.started()
    assert watcher.step(1).step == 1  # picks up at the current step
    server.batcher.set_step_budget(None)
    result = watcher.completed().result
    assert [event.step for event in watcher.seen if isinstance(event, Step)] == [1, 2, 3, 4]
    assert engine_runs(server) == runs + 1
    uninterrupted = client.generate("a harbour", seed=9, steps=4)
    assert image_bytes(result) == image_bytes(uninterrupted)


def test_without_a_key_a_disconnect_still_cancels(server: Any) -> None:
    server.batcher.set_step_budget(0)
    client = server.client()
    runs = engine_runs(server)
    stream = client.stream("a harbour", seed=9, steps=4)
    server.batcher.set_step_budget(1)
    for event in stream:
        if isinstance(event, Step):
            break
    stream.close()
    assert server.run(server.batcher.wait_idle(30))  # its rows left at the boundary
    assert engine_runs(server) == runs


CLIENT_TOKEN = "client-token-0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789abcdef"


@pytest.fixture
def tokens(tmp_path: Any) -> Any:
    path = tmp_path / "tokens"
    path.write_text(f"client:{CLIENT_TOKEN}\nadmin:{ADMIN_TOKEN}\n")
    return path
