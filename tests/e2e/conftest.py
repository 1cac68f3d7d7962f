"""A real `imagegen-server serve` process, as deployments run it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

BIN = Path(sys.executable).parent
LISTENING = re.compile(r"gRPC on [^ ]+:(\d+), metrics on [^ ]+:(\d+)")


@dataclass
class ServerProcess:
    process: subprocess.Popen[str]
    port: int
    metrics_port: int
    log: list[str] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_serving(self, timeout: float = 120) -> None:
        """Blocks on the health Watch stream until SERVING (no polling)."""
        with grpc.insecure_channel(self.target) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="imagegen.v1.ImageGeneration"),
                timeout=timeout,
            )
            for response in watch:
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    watch.cancel()
                    return


def launch(model: Path, *flags: str) -> ServerProcess:
    """Starts the server on free ports; returns once it listens (model still loading)."""
    command = [
        str(BIN / "imagegen-server"),
        "serve",
        "--model",
        str(model),
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--min-width",
        "32",
        "--min-height",
        "32",
        "--default-width",
        "64",
        "--default-height",
        "64",
        "--default-steps",
        "4",
        *flags,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("IMAGEGEN_CONFIG", None)
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    assert process.stderr is not None
    log: list[str] = []
    for line in process.stderr:  # the log line that names the bound ports
        log.append(line)
        match = LISTENING.search(line)
        if match:
            break
    else:
        raise RuntimeError("server exited before listening:\n" + "".join(log))
    server = ServerProcess(process, int(match.group(1)), int(match.group(2)), log)
    # Keep draining stderr so the server never blocks on a full pipe.
    threading.Thread(target=lambda: log.extend(process.stderr), daemon=True).start()  # type: ignore[arg-type]
    return server


@pytest.fixture(scope="module")
def server_process(tiny_model: Path) -> Iterator[ServerProcess]:
    server = launch(tiny_model)
    server.wait_serving()
    yield server
    server.process.terminate()
    server.process.wait(60)
