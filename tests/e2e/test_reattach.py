"""Detach and reattach: a client process killed mid-stream (a real SIGKILL) whose request carried
an idempotency key; a new process repeating the call picks the request up where it is."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

# A client process: streams one request, prints one line per event, writes the image at the end.
CLIENT = """
import sys
from imagegen_client import Completed, ImageGenClient, Step

target, key, output = sys.argv[1:4]
with ImageGenClient(target) as client:
    for event in client.stream("a harbour at dusk", seed=11, steps=4, idempotency_key=key):
        if isinstance(event, Completed):
            with open(output, "wb") as file:
                file.write(event.result.images[0].data)
        suffix = f" {event.step}" if isinstance(event, Step) else ""
        print(f"{type(event).__name__}{suffix}", flush=True)
"""
LINE_TIMEOUT_S = 120.0
POLLS = 20_000  # bounded waits on the server's own state, never on time


class ClientProcess:
    def __init__(self, target: str, key: str, output: Path) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        self.process = subprocess.Popen(
            [sys.executable, "-c", CLIENT, target, key, str(output)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: list[str] = []

    def read_until(self, wanted: str) -> list[str]:
        """Lines up to and including `wanted`."""
        assert self.process.stdout is not None
        start = len(self.lines)
        for line in self.process.stdout:
            self.lines.append(line.strip())
            if line.strip() == wanted:
                return self.lines[start:]
        raise AssertionError(f"the client ended before {wanted!r}: {self.lines}")

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)  # no goodbye: the connection just drops
        self.process.wait(LINE_TIMEOUT_S)

    def finish(self) -> None:
        assert self.process.wait(LINE_TIMEOUT_S) == 0


def cancelled_streams(server: Any) -> float:
    return server.metrics().get(
        'imagegen_requests_total{code="CANCELLED",protocol="grpc",rpc="StreamProgress"}', 0
    )


def wait_until_the_server_saw_the_disconnect(server: Any, before: float) -> None:
    for _ in range(POLLS):
        if cancelled_streams(server) > before:
            return
    raise AssertionError("the server never saw the client's connection drop")


def engine_runs(server: Any) -> float:
    return server.metrics().get("imagegen_request_compute_seconds_count", 0.0)


def test_a_killed_client_reattaches_from_a_new_process_and_gets_the_rest(
    server_factory: Any, tmp_path: Path
) -> None:
    server = server_factory(step_budget=0)
    runs, cancelled = engine_runs(server), cancelled_streams(server)
    first = ClientProcess(server.target, "harbour-1", tmp_path / "first.png")
    first.read_until("Queued")
    server.batcher.set_step_budget(1)
    first.read_until("Step 1")
    first.kill()
    wait_until_the_server_saw_the_disconnect(server, cancelled)
    assert server.metrics()["imagegen_running_rows"] == 1  # with a key it runs on
    second = ClientProcess(server.target, "harbour-1", tmp_path / "second.png")
    assert second.read_until("Step 1") == ["Started", "Step 1"]  # where the request is now
    server.batcher.set_step_budget(None)
    assert second.read_until("Completed") == ["Step 2", "Step 3", "Step 4", "Completed"]
    second.finish()
    assert engine_runs(server) == runs + 1  # the same request, never computed twice
    uninterrupted = server.client().generate("a harbour at dusk", seed=11, steps=4)
    assert (tmp_path / "second.png").read_bytes() == uninterrupted.images[0].data


def test_a_killed_client_without_a_key_cancels_its_request(
    server_factory: Any, tmp_path: Path
) -> None:
    server = server_factory(step_budget=0)
    runs = engine_runs(server)
    client = ClientProcess(server.target, "", tmp_path / "never.png")
    client.read_until("Queued")
    server.batcher.set_step_budget(1)
    client.read_until("Step 1")
    client.kill()
    assert server.run(server.batcher.wait_idle(60))  # its rows left at the step boundary
    server.batcher.set_step_budget(None)
    assert engine_runs(server) == runs
    assert not (tmp_path / "never.png").exists()
