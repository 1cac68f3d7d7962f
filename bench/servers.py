"""Server subprocesses: start one, wait for SERVING, read its metrics, stop it whatever happens.

Every system (naive, request-level, step-level, step-level stepping every row) is a separate
process started the same way; each prints the same `gRPC on HOST:PORT, metrics on HOST:PORT`
line on stderr, answers the same `Generate` RPC and the same grpc.health.v1 Watch, and exports
the same few metrics. Their stderr is drained on a thread for their whole life so a chatty
server never blocks on a full pipe.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[1]
LISTENING = re.compile(r"gRPC on [^ ]+:(\d+), metrics on [^ ]+:(\d+)")
HEALTH_SERVICE = "imagegen.v1.ImageGeneration"
HOST = "127.0.0.1"  # the bench only ever talks to this machine
LOG_LINES_KEPT = 200
STOP_GRACE_S = 15.0  # SIGTERM, then this long to drain and exit, then SIGKILL
IDLE_POLL_S = 0.1
STEP_SECONDS = 'imagegen_stage_seconds_{}{{stage="denoise_step"}}'


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """Settings every system gets, so they differ only in how they batch."""

    model: Path
    device: str  # auto | cpu | cuda | cuda:N
    dtype: str  # auto | float32 | bfloat16 | float16
    torch_threads: int  # 0 = torch's default
    max_batch_size: int  # rows per denoising step (batching servers)
    max_queue_size: int  # most waiting requests; more get UNAVAILABLE
    default_width: int  # the size of the servers' own warm-up batch
    default_height: int
    default_steps: int
    min_size: int  # smallest width/height the servers accept


# How each system of `imagegen-server serve` batches: its --batching and any further flags.
BATCHING: dict[str, tuple[str, tuple[str, ...]]] = {
    "request": ("request", ()),
    "step": ("step", ()),  # with its default cost-aware row selection
    "step-all": ("step", ("--row-selection", "all")),
}


def server_command(options: ServerOptions, system: str) -> list[str]:
    """The command line of one bench system: "naive" or one of BATCHING."""
    if system == "naive":
        return naive_server_command(options)
    batching, extra = BATCHING[system]
    return real_server_command(options, batching, extra)


def real_server_command(
    options: ServerOptions, batching: str, extra: Sequence[str] = ()
) -> list[str]:
    """`imagegen-server serve` as deployments run it, with `--batching request|step` and
    `extra` flags."""
    script = Path(sys.executable).parent / "imagegen-server"
    launcher = [str(script)] if script.exists() else [sys.executable, "-m", "imagegen_server.main"]
    return [
        *launcher,
        "serve",
        *_shared_flags(options),
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--batching",
        batching,
        "--max-batch-size",
        str(options.max_batch_size),
        "--min-width",
        str(options.min_size),
        "--min-height",
        str(options.min_size),
        "--drain-timeout-s",
        "5",
        *extra,
    ]


def naive_server_command(options: ServerOptions) -> list[str]:
    """bench/naive_server.py: `pipe(...)` one request at a time."""
    return [sys.executable, "-m", "bench.naive_server", *_shared_flags(options)]


def _shared_flags(options: ServerOptions) -> list[str]:
    """The flags both servers take alike: model, address, device, queue, default request."""
    return [
        "--model",
        str(options.model),
        "--host",
        HOST,
        "--device",
        options.device,
        "--dtype",
        options.dtype,
        "--torch-threads",
        str(options.torch_threads),
        "--max-queue-size",
        str(options.max_queue_size),
        "--default-width",
        str(options.default_width),
        "--default-height",
        str(options.default_height),
        "--default-steps",
        str(options.default_steps),
    ]


def rotated(systems: Sequence[str], by: int) -> list[str]:
    """`systems` starting at the `by`-th (cyclically): servers measured side by side take turns
    going first, so the machine's drift does not favour one."""
    shift = by % len(systems)
    return list(systems[shift:]) + list(systems[:shift])


DEFAULT_MODEL = Path(".cache/bench-model")  # written with the bench preset when missing


def ensure_model(directory: Path, preset: str = "bench") -> None:
    """Writes `preset` of the random-weight model to `directory` if it is missing."""
    if (directory / "model_index.json").exists():
        return
    from imagegen_server.engine.tiny_model import write_tiny_model

    print(f"writing the {preset} preset model to {directory}", flush=True)
    write_tiny_model(directory, preset=preset)


def describe_model(directory: Path) -> str:
    """The report's words for the model in `directory`."""
    from imagegen_server.engine.tiny_model import RANDOM_WEIGHTS_FILE

    marker = directory / RANDOM_WEIGHTS_FILE
    if marker.is_file():
        preset = json.loads(marker.read_text())["preset"]
        return f"the `{preset}` preset of the random-weight model, its weights drawn on the device"
    if directory == DEFAULT_MODEL:
        return "the `bench` preset of the random-weight model"
    return f"the model in `{directory}`"


class ServerProcess:
    """One server subprocess. Use as a context manager: it is stopped on exit, error or not."""

    def __init__(self, name: str, command: list[str]) -> None:
        self.name = name
        self.command = command
        self.port = 0
        self.metrics_port = 0
        self._process: subprocess.Popen[str] | None = None
        self._log: collections.deque[str] = collections.deque(maxlen=LOG_LINES_KEPT)
        self._listening = threading.Event()

    @property
    def target(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def log_tail(self, lines: int = 30) -> str:
        return "".join(list(self._log)[-lines:])

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, timeout_s: float = 120.0) -> None:
        """Starts the process; returns once it listens (the model may still be loading).

        Raises:
            RuntimeError: it exited or did not listen within `timeout_s`.
        """
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("IMAGEGEN_CONFIG", None)  # the flags alone define the server
        self._process = subprocess.Popen(
            self.command,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._drain_stderr, name=f"{self.name}-stderr", daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while not self._listening.wait(0.1):
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name} server did not start listening:\n{self.log_tail()}"
                )

    async def wait_serving(self, timeout_s: float = 300.0) -> None:
        """Waits on the grpc.health.v1 Watch stream until SERVING.

        Raises:
            RuntimeError: the process exited, or was not SERVING within `timeout_s`.
        """
        async with grpc.aio.insecure_channel(self.target) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=HEALTH_SERVICE), timeout=timeout_s
            )
            try:
                async for response in watch:
                    if response.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.aio.AioRpcError as error:
                raise RuntimeError(
                    f"{self.name} server never became SERVING ({error.code().name}):\n"
                    f"{self.log_tail()}"
                ) from error
            finally:
                watch.cancel()
        raise RuntimeError(f"{self.name} server closed the health stream:\n{self.log_tail()}")

    def metrics(self) -> dict[str, float]:
        """The server's Prometheus samples, `name{labels}` -> value."""
        url = f"http://{HOST}:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return parse_metrics(response.read().decode())

    async def wait_idle(self, timeout_s: float = 60.0) -> bool:
        """Waits until nothing is queued or running (after a run cut requests off).

        Idle means no pending request and either no running row or no denoising step for a
        while: the real server's `imagegen_running_rows` gauge keeps its last value when the
        rows of cancelled requests are dropped without a further step (see the bench report).
        """
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout_s
        last_steps, quiet_since = -1.0, time.monotonic()
        while time.monotonic() < deadline:
            samples = await loop.run_in_executor(None, self.metrics)
            if samples.get("imagegen_pending_requests", 0) == 0:
                if samples.get("imagegen_running_rows", 0) == 0:
                    return True
                steps = samples.get("imagegen_batch_size_count", 0)
                if steps != last_steps:
                    last_steps, quiet_since = steps, time.monotonic()
                elif time.monotonic() - quiet_since > quiet_period_s(samples):
                    return True
            await asyncio.sleep(IDLE_POLL_S)
        return False

    def stop(self) -> int | None:
        """SIGTERM (graceful drain), then SIGKILL after STOP_GRACE_S; returns the exit code."""
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def _drain_stderr(self) -> None:
        assert self._process is not None and self._process.stderr is not None
        for line in self._process.stderr:
            self._log.append(line)
            if not self._listening.is_set():
                match = LISTENING.search(line)
                if match:
                    self.port, self.metrics_port = int(match.group(1)), int(match.group(2))
                    self._listening.set()


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format -> {`name{labels}`: value}; comments and bad lines skipped."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            samples[name] = float(value)
        except ValueError:
            continue
    return samples


def rows_per_step(before: dict[str, float], after: dict[str, float]) -> float | None:
    """Mean rows per denoising step between two scrapes (the batch-size histogram's deltas)."""
    count = after.get("imagegen_batch_size_count", 0) - before.get("imagegen_batch_size_count", 0)
    total = after.get("imagegen_batch_size_sum", 0) - before.get("imagegen_batch_size_sum", 0)
    return total / count if count > 0 else None


def quiet_period_s(samples: dict[str, float]) -> float:
    """No step for this long means none is running: two mean step times, at least 0.5 s. (A
    step still finishing then only delays the next run's warm-up, which is not measured.)"""
    count = samples.get(STEP_SECONDS.format("count"), 0)
    total = samples.get(STEP_SECONDS.format("sum"), 0)
    return max(0.5, 2 * total / count) if count else 2.0
