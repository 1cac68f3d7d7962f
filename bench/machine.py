"""What machine the numbers came from, and how much of its CPU something else used meanwhile.

On a small shared machine another process (a test suite, a build) can take a core in the middle
of a run and the numbers mean little. `CpuMeter` measures it per run: all CPU time the machine
spent, minus what the bench and its server used, is reported as background cores next to the
results, so a reader can tell a slow server from a busy machine.
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

# Other processes using more than this many cores during a run make its numbers suspect: torch's
# OpenMP threads stall whenever one of them loses its core (a step can take 10x longer).
BUSY_CORES = 0.25
QUIET_WINDOW_S = 1.0  # the CPU use of other processes is measured over windows this long


def describe_machine(torch_threads: int, device: str) -> dict[str, Any]:
    """CPU model, cores, memory, library versions and threads: the report's machine line."""
    import diffusers
    import grpc
    import torch

    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "grpcio": grpc.__version__,
        "torch_threads": torch_threads or torch.get_num_threads(),
        "device": device,
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


@dataclass(slots=True)
class CpuUse:
    """CPU use over one run, in cores (1.0 = one core busy the whole time)."""

    ours: float  # the bench process and the server under test
    background: float  # everything else on the machine
    steal: float  # time the hypervisor gave our virtual CPUs to someone else


class CpuMeter:
    """Measures CPU use between `start()` and `stop()` for the given process ids."""

    def __init__(self, pids: list[int]) -> None:
        self._processes = [psutil.Process(pid) for pid in pids]
        self._started = 0.0
        self._busy = 0.0
        self._steal = 0.0
        self._ours = 0.0

    def start(self) -> None:
        self._busy, self._steal = _machine_busy()
        self._ours = self._our_seconds()
        self._started = time.monotonic()

    def stop(self) -> CpuUse:
        wall = max(1e-9, time.monotonic() - self._started)
        busy, steal = _machine_busy()
        ours = self._our_seconds() - self._ours
        machine = busy - self._busy
        return CpuUse(
            ours=round(ours / wall, 3),
            background=round(max(0.0, machine - ours) / wall, 3),
            steal=round((steal - self._steal) / wall, 3),
        )

    def _our_seconds(self) -> float:
        total = 0.0
        for process in self._processes:
            try:
                times = process.cpu_times()
            except psutil.Error:  # exited
                continue
            total += times.user + times.system
        return total


def wait_for_quiet(
    pids: list[int],
    max_background: float,
    timeout_s: float,
    on_busy: Callable[[float], object] = lambda background: None,
) -> float:
    """Measures what processes other than `pids` use, one QUIET_WINDOW_S at a time, until it is
    at most `max_background` cores or `timeout_s` has passed (`on_busy` hears each busy window);
    returns the last window's background cores."""
    deadline = time.monotonic() + timeout_s
    while True:
        meter = CpuMeter(pids)
        meter.start()
        time.sleep(QUIET_WINDOW_S)
        background = meter.stop().background
        if background <= max_background or time.monotonic() > deadline:
            return background
        on_busy(background)


def _machine_busy() -> tuple[float, float]:
    """(busy CPU seconds, steal seconds) of the whole machine since boot."""
    times = psutil.cpu_times()
    idle = times.idle + getattr(times, "iowait", 0.0)
    steal = getattr(times, "steal", 0.0)
    # guest time is already inside user time on Linux; steal is not ours to count as busy.
    busy = (
        sum(times) - idle - steal - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
    )
    return busy, steal
