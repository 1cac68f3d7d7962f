"""Server subprocesses, for the benchmarks and tests/e2e alike: start one, wait for SERVING, read
its metrics, stop it.

Every server (`imagegen-server serve`, or the bench's naive baseline) prints
`gRPC on HOST:PORT, metrics on HOST:PORT` on stderr once it listens, answers grpc.health.v1 and
serves Prometheus text on its metrics port. A thread drains its stderr into `log` for its whole
life, so a chatty server never blocks on a full pipe. Every wait is bounded: start-up waits on
that log line, readiness on the health Watch stream (the server pushes each change), each with
a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

HOST = "127.0.0.1"  # servers started here listen on loopback only
HEALTH_SERVICE = "imagegen.v1.ImageGeneration"
LISTENING = re.compile(r"gRPC on [^ ]+:(\d+), metrics on [^ ]+:(\d+)")
HTTP_LISTENING = re.compile(r"HTTP on [^ ]+:(\d+)")  # on the same line, with --http-port
LISTEN_TIMEOUT_S = 120.0  # from the start to the log line naming the ports
SERVING_TIMEOUT_S = 120.0  # from listening to SERVING (loading and warming the model)
STOP_GRACE_S = 15.0  # SIGTERM, then this long to drain and exit, then SIGKILL
METRICS_TIMEOUT_S = 10.0


def server_executable() -> list[str]:
    """`imagegen-server` of this interpreter's environment (`python -m` where no script is)."""
    script = Path(sys.executable).parent / "imagegen-server"
    return [str(script)] if script.exists() else [sys.executable, "-m", "imagegen_server.main"]


def serve_command(model: Path, *flags: str) -> list[str]:
    """`imagegen-server serve` on free ports (unless `flags` name one: the last given counts)."""
    return [
        *server_executable(),
        "serve",
        "--model",
        str(model),
        "--port",
        "0",
        "--metrics-port",
        "0",
        *flags,
    ]


def server_env() -> dict[str, str]:
    """This environment without a config file from it (the flags alone set the server up), and
    unbuffered, so each log line arrives when it is written."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("IMAGEGEN_CONFIG", None)
    return env


@dataclass(frozen=True, slots=True)
class Metrics:
    """One scrape of a server's /metrics, read with prometheus_client's parser."""

    samples: tuple[Any, ...]  # prometheus_client.samples.Sample: name, labels, value

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called `name` (e.g. `imagegen_batch_size_count`) whose labels
        include `labels`; 0 when there is none."""
        return float(
            sum(
                sample.value
                for sample in self.samples
                if sample.name == name and labels.items() <= sample.labels.items()
            )
        )


def parse_metrics(text: str) -> Metrics:
    """Prometheus text format -> Metrics."""
    families = text_string_to_metric_families(text)
    return Metrics(tuple(sample for family in families for sample in family.samples))


class ServerProcess:
    """One running server subprocess, made by `start`. Use as a context manager (it is stopped
    on exit, error or not), or call `stop`."""

    def __init__(
        self, command: Sequence[str], name: str, cwd: Path | None, log_lines: int | None
    ) -> None:
        self.name = name  # in error messages
        self.port = 0  # gRPC, once listening
        self.metrics_port = 0
        self.http_port = 0  # the OpenAI-compatible API, when served (--http-port)
        self.log: collections.deque[str] = collections.deque(maxlen=log_lines)  # its stderr
        self._listening = threading.Event()  # set at the LISTENING line, or at end of stderr
        self.process = subprocess.Popen(
            list(command),
            cwd=cwd,
            env=server_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._drain_stderr, name=f"{name}-log", daemon=True)
        self._reader.start()

    @classmethod
    def start(
        cls,
        command: Sequence[str],
        name: str = "imagegen-server",
        cwd: Path | None = None,
        log_lines: int | None = None,
        timeout_s: float = LISTEN_TIMEOUT_S,
    ) -> ServerProcess:
        """Starts `command` and returns once it listens (the model may still be loading).

        Args:
            command: the server's command line; it must log the LISTENING line.
            name: the server's name in errors.
            cwd: the directory it runs in (None: this process's).
            log_lines: how many of the last stderr lines `log` keeps (None: all).
            timeout_s: how long it may take to listen.

        Raises:
            RuntimeError: it exited, or did not listen within `timeout_s` (it is stopped).
        """
        server = cls(command, name, cwd, log_lines)
        if not server._listening.wait(timeout_s) or not server.port:
            server.stop()
            raise RuntimeError(f"{name}: did not start listening:\n{server.log_tail()}")
        return server

    @property
    def target(self) -> str:
        return f"{HOST}:{self.port}"

    def log_tail(self, lines: int = 30) -> str:
        return "".join(list(self.log)[-lines:])

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def wait_serving(self, timeout_s: float = SERVING_TIMEOUT_S) -> None:
        """Blocks on the grpc.health.v1 Watch stream until SERVING.

        Raises:
            RuntimeError: the server went away, or was not SERVING within `timeout_s`.
        """
        with grpc.insecure_channel(self.target) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=HEALTH_SERVICE), timeout=timeout_s
            )
            try:
                for response in watch:
                    if response.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.RpcError as error:
                raise RuntimeError(
                    f"{self.name}: never SERVING ({error.code().name}):\n{self.log_tail()}"
                ) from error
            finally:
                watch.cancel()
        raise RuntimeError(f"{self.name}: the health stream closed:\n{self.log_tail()}")

    def metrics(self) -> Metrics:
        """The server's metrics now."""
        url = f"http://{HOST}:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=METRICS_TIMEOUT_S) as response:
            return parse_metrics(response.read().decode())

    def wait(self, timeout: float) -> int:
        """Waits, as `Popen.wait`, for the process to exit and for its last log lines; returns
        its exit code.

        The last lines (a drain's, written just before the process leaves) are still in the
        pipe when the process is gone, so `log` is complete only once the reader has ended.

        Raises:
            subprocess.TimeoutExpired: still running after `timeout` seconds.
            RuntimeError: its stderr stayed open after it exited (a child holds it).
        """
        code = self.process.wait(timeout)
        self._reader.join(timeout)
        if self._reader.is_alive():
            raise RuntimeError(f"{self.name}: stderr still open after the process exited")
        return code

    def stop(self, grace_s: float = STOP_GRACE_S) -> int:
        """SIGTERM (a graceful drain), then SIGKILL after `grace_s`; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(grace_s)
        return self.process.returncode

    def _drain_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            match = None if self._listening.is_set() else LISTENING.search(line)
            if match:
                self.port, self.metrics_port = int(match.group(1)), int(match.group(2))
                http = HTTP_LISTENING.search(line)
                self.http_port = int(http.group(1)) if http else 0
                self._listening.set()
        self._listening.set()  # end of stderr: the process is gone, `start` need not wait
