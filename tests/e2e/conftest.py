"""A real `imagegen-server serve` process, as deployments run it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
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
    log: list[str]  # its stderr, line by line, as the reader appends it
    reader: threading.Thread  # appends the rest of stderr to `log`; ends at end of file

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait(self, timeout: float) -> int:
        """Waits for the process to exit and for its last log lines; returns its exit code.

        The last lines (the drain's, written just before the process leaves) are still in the
        pipe when the process is gone, so `log` is complete only once the reader has ended.
        """
        code = self.process.wait(timeout)
        self.reader.join(timeout)
        assert not self.reader.is_alive(), "stderr still open after the server exited"
        return code

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


def server_command(model: Path, *flags: str) -> list[str]:
    """`imagegen-server serve` on free ports (unless `flags` name one: the last given counts)."""
    serve = [str(BIN / "imagegen-server"), "serve", "--model", str(model)]
    return [*serve, "--port", "0", "--metrics-port", "0", *flags]


def server_env() -> dict[str, str]:
    """This environment, without a config file from it: the flags alone set the server up."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("IMAGEGEN_CONFIG", None)
    return env


def launch(model: Path, *flags: str) -> ServerProcess:
    """Starts the server on free ports with small test sizes; returns once it listens (model
    still loading)."""
    command = server_command(
        model,
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
    )
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=server_env())
    stderr = process.stderr
    assert stderr is not None
    log: list[str] = []
    for line in stderr:  # the log line that names the bound ports
        log.append(line)
        match = LISTENING.search(line)
        if match:
            break
    else:
        raise RuntimeError("server exited before listening:\n" + "".join(log))
    # Keep draining stderr so the server never blocks on a full pipe.
    reader = threading.Thread(target=lambda: log.extend(stderr), daemon=True)
    reader.start()
    return ServerProcess(process, int(match.group(1)), int(match.group(2)), log, reader)


@pytest.fixture(scope="module")
def server_process(tiny_model: Path) -> Iterator[ServerProcess]:
    server = launch(tiny_model)
    server.wait_serving()
    yield server
    server.process.terminate()
    server.wait(60)
