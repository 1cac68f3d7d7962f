"""The bench's servers: how each system is started, when it is idle, and one measured run on it.

Every system (naive, request-level, step-level, step-level stepping every row) is a separate
process started by bench/launch.py; each answers the same `Generate` RPC and exports the same
few metrics, which a run reads before and after itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .launch import HOST, Metrics, ServerProcess, serve_command
from .machine import CpuMeter, CpuUse
from .stats import RequestRecord

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[1]
LOG_LINES_KEPT = 200  # a bench server runs for minutes; its last lines explain a failure
SERVING_TIMEOUT_S = 300.0  # a full-size model loads and warms up for minutes
IDLE_POLL_S = 0.1
IDLE_TIMEOUT_S = 60.0
DEFAULT_MODEL = Path(".cache/bench-model")  # written with the bench preset when missing


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

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, max_queue_size: int, min_size: int
    ) -> ServerOptions:
        """From the options the server benchmarks share: the engine's (cli.py), --resolution
        (the default size), --steps and --max-batch-size."""
        width, height = args.resolution
        return cls(
            model=args.model,
            device=args.device,
            dtype=args.dtype,
            torch_threads=args.torch_threads,
            max_batch_size=args.max_batch_size,
            max_queue_size=max_queue_size,
            default_width=width,
            default_height=height,
            default_steps=args.steps,
            min_size=min_size,
        )


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
    return serve_command(
        options.model,
        *_shared_flags(options),
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
    )


def naive_server_command(options: ServerOptions) -> list[str]:
    """bench/naive_server.py: `pipe(...)` one request at a time."""
    naive = [sys.executable, "-m", "bench", "naive-server", "--model", str(options.model)]
    return [*naive, *_shared_flags(options)]


def _shared_flags(options: ServerOptions) -> list[str]:
    """The flags both servers take alike: address, device, queue, default request."""
    return [
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


async def start_server(name: str, command: list[str]) -> ServerProcess:
    """Starts one bench server (from the repository root, where `-m bench` and the default
    model's relative path resolve) and waits until it is SERVING; the caller stops it."""
    server = ServerProcess.start(command, name=name, cwd=REPO_ROOT, log_lines=LOG_LINES_KEPT)
    try:
        await asyncio.to_thread(server.wait_serving, SERVING_TIMEOUT_S)
    except BaseException:
        server.stop()
        raise
    return server


def rotated(systems: Sequence[T], by: int) -> list[T]:
    """`systems` starting at the `by`-th (cyclically): servers measured side by side take turns
    going first, so the machine's drift does not favour one."""
    shift = by % len(systems)
    return list(systems[shift:]) + list(systems[:shift])


def ensure_model(
    directory: Path, preset: str = "bench", pipeline_kind: str = "text-to-image"
) -> None:
    """Writes `preset` of the random-weight model (as a `pipeline_kind` checkpoint) to
    `directory` if it is missing."""
    if (directory / "model_index.json").exists():
        return
    from imagegen_server.engine.tiny_model import write_tiny_model

    print(f"writing the {preset} preset {pipeline_kind} model to {directory}", flush=True)
    write_tiny_model(directory, preset=preset, pipeline_kind=pipeline_kind)


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


async def wait_idle(server: ServerProcess, timeout_s: float = IDLE_TIMEOUT_S) -> bool:
    """Waits until nothing is queued or running on `server` (after a run cut requests off).

    Idle means no pending request and either no running row or no denoising step for a
    while: the real server's `imagegen_running_rows` gauge keeps its last value when the
    rows of cancelled requests are dropped without a further step (see the bench report).
    """
    deadline = time.monotonic() + timeout_s
    last_steps, quiet_since = -1.0, time.monotonic()
    while time.monotonic() < deadline:
        samples = await asyncio.to_thread(server.metrics)
        if samples.value("imagegen_pending_requests") == 0:
            if samples.value("imagegen_running_rows") == 0:
                return True
            steps = samples.value("imagegen_batch_size_count")
            if steps != last_steps:
                last_steps, quiet_since = steps, time.monotonic()
            elif time.monotonic() - quiet_since > quiet_period_s(samples):
                return True
        await asyncio.sleep(IDLE_POLL_S)
    return False


def rows_per_step(before: Metrics, after: Metrics) -> float | None:
    """Mean rows per denoising step between two scrapes (the batch-size histogram's deltas)."""
    count = after.value("imagegen_batch_size_count") - before.value("imagegen_batch_size_count")
    total = after.value("imagegen_batch_size_sum") - before.value("imagegen_batch_size_sum")
    return total / count if count > 0 else None


def quiet_period_s(samples: Metrics) -> float:
    """No step for this long means none is running: two mean step times, at least 0.5 s. (A
    step still finishing then only delays the next run's warm-up, which is not measured.)"""
    count = samples.value("imagegen_stage_seconds_count", stage="denoise_step")
    total = samples.value("imagegen_stage_seconds_sum", stage="denoise_step")
    return max(0.5, 2 * total / count) if count else 2.0


@dataclass(slots=True)
class Measured:
    """One run on one server, with what the machine and the server saw around it."""

    records: list[RequestRecord]  # every request the run sent
    end_s: float  # closed loop: when the clients stopped; open loop: the last arrival
    cpu: CpuUse
    before: Metrics  # the server's metrics right before the run ...
    after: Metrics  # ... and right after it
    wall_s: float

    @property
    def rows_per_step(self) -> float | None:
        return rows_per_step(self.before, self.after)


Drive = Callable[[Metrics], Awaitable[tuple[list[RequestRecord], float]]]


async def measure(server: ServerProcess, drive: Drive) -> Measured:
    """Waits for `server` to be idle, then runs `drive` (given the metrics just before; it
    returns the records and `end_s`) with the CPU meter and the server's metrics around it."""
    if not await wait_idle(server):
        print(f"  warning: {server.name} server still busy before the run", flush=True)
    meter = CpuMeter([os.getpid(), server.process.pid])
    before = await asyncio.to_thread(server.metrics)
    meter.start()
    started = time.monotonic()
    records, end_s = await drive(before)
    wall_s = time.monotonic() - started
    cpu = meter.stop()
    after = await asyncio.to_thread(server.metrics)
    return Measured(records, end_s, cpu, before, after, wall_s)
