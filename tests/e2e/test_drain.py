"""Graceful drain at SIGTERM on a real server process: nothing accepted is lost."""

from __future__ import annotations

import queue
import signal
import threading
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from imagegen_client import Completed, ImageGenClient, RetryPolicy, Started
from support import StreamWatcher

from .conftest import ServerProcess, launch

# Long enough that a batch is still running when the test signals: 6 rows x 24 steps at
# 128x128 take seconds on the tiny model, the signal takes microseconds.
SLOW = {"width": 128, "height": 128, "steps": 24}


def watch_health(server: ServerProcess) -> queue.Queue[int]:
    """Streams the server's health statuses (grpc.health.v1 Watch) into a queue."""
    statuses: queue.Queue[int] = queue.Queue()

    def consume() -> None:
        with grpc.insecure_channel(server.target) as channel:
            request = health_pb2.HealthCheckRequest(service="imagegen.v1.ImageGeneration")
            try:
                for response in health_pb2_grpc.HealthStub(channel).Watch(request, timeout=300):
                    statuses.put(response.status)
            except grpc.RpcError:
                statuses.put(-1)  # the server went away

    threading.Thread(target=consume, daemon=True).start()
    return statuses


def start_twelve(server: ServerProcess) -> tuple[list[StreamWatcher], list[StreamWatcher]]:
    client = ImageGenClient(server.target, retry=RetryPolicy(max_attempts=1))
    watchers = [StreamWatcher(client, f"drain {i}", seed=i, **SLOW) for i in range(12)]
    for watcher in watchers:
        watcher.queued()
    running = [w for w in watchers if any(isinstance(e, Started) for e in w.seen)]
    for watcher in watchers:  # the first six start together, the other six stay queued
        if watcher not in running and len(running) < 6:
            watcher.started()
            running.append(watcher)
    return running, [w for w in watchers if w not in running]


def test_sigterm_finishes_everything_accepted_refuses_new_work_and_exits_zero(
    tiny_model: Path,
) -> None:
    server = launch(
        tiny_model,
        "--max-batch-size",
        "6",
        "--max-num-images",
        "1",
        "--max-active-batches",
        "1",
        "--max-steps",
        "50",
        "--max-width",
        "256",
        "--max-height",
        "256",
        "--drain-timeout-s",
        "120",
    )
    server.wait_serving()
    health = watch_health(server)
    assert health.get(timeout=30) == health_pb2.HealthCheckResponse.SERVING
    running, queued = start_twelve(server)
    assert len(running) == 6 and len(queued) == 6
    assert not any(isinstance(e, Started) for w in queued for e in w.seen)

    server.process.send_signal(signal.SIGTERM)
    assert health.get(timeout=30) == health_pb2.HealthCheckResponse.NOT_SERVING
    with ImageGenClient(server.target, retry=RetryPolicy(max_attempts=1)) as late:
        try:
            late.generate("after the signal", seed=99)
            raise AssertionError("a request after SIGTERM was accepted")
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "draining" in error.details()
    for watcher in running + queued:
        completed = watcher.completed()
        assert isinstance(completed, Completed) and len(completed.result.images) == 1
    assert server.wait(timeout=120) == 0
    assert any("drained cleanly" in line for line in server.log)


def test_a_second_sigterm_stops_at_once(tiny_model: Path) -> None:
    server = launch(
        tiny_model,
        "--max-batch-size",
        "6",
        "--max-num-images",
        "1",
        "--max-steps",
        "50",
        "--max-width",
        "256",
        "--max-height",
        "256",
        "--drain-timeout-s",
        "600",
    )
    server.wait_serving()
    health = watch_health(server)
    assert health.get(timeout=30) == health_pb2.HealthCheckResponse.SERVING
    _, queued = start_twelve(server)
    server.process.send_signal(signal.SIGTERM)
    # Signals sent back to back can merge into one; the second goes once the first took hold.
    assert health.get(timeout=30) == health_pb2.HealthCheckResponse.NOT_SERVING
    server.process.send_signal(signal.SIGTERM)
    # Far sooner than the 600 s drain bound, and before the queued work could have run.
    assert server.wait(timeout=30) == 0
    ended: list[Any] = []
    for watcher in queued:
        try:
            ended.append(watcher.completed())
        except grpc.RpcError as error:
            ended.append(error.code())
    assert grpc.StatusCode.UNAVAILABLE in ended or grpc.StatusCode.CANCELLED in ended
