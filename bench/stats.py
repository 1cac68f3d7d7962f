"""Percentiles and per-run summaries. Pure Python: no torch, no sockets, no clock.

A run is a list of `RequestRecord`s (times in seconds from the run's start). Which records count
is decided here, once, for every system:

- closed loop: latencies are those of every request that completed, minus each client's first
  one (it started with everyone else at t=0, so its wait is a start-up artefact; every later
  request was sent when another finished and sees the steady state). Throughput is clients /
  mean latency: with no think time every client always has exactly one request in the system,
  so Little's law makes this exact in the steady state. A plain count of completions in a
  window would be too coarse: batches finish up to max_batch_size images at once, a burst
  every few seconds on a CPU. That count is kept as `window_throughput_ips` for comparison.
- open loop: the requests that *arrived* after the warm-up count; a request the bench cut off
  at the drain cap is an unfinished one and counts as an infinitely slow request, so a
  percentile that falls among them is reported as unknown (None) rather than hidden.
  Throughput is every completion of the run over the span from the first arrival to the last
  completion: the offered rate while the server keeps up (a little below it, by one latency
  over the span), its capacity when it does not.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

OK = "OK"
# The step count in a request class's label: "256x256/8", "256x256/8+ink+cfg", "256x256/4@fast".
STEPS_IN_LABEL = re.compile(r"/(\d+)")
CUT = "CUT"  # still running when the bench stopped waiting; cancelled by the bench


@dataclass(slots=True)
class RequestRecord:
    """One request of a run, as the load generator saw it."""

    index: int  # issue order within the run
    steps: int  # denoising steps asked for
    label: str  # request class, e.g. "256x256/8"
    issued_s: float  # seconds from the run's start
    client: int = -1  # closed loop: which client sent it; open loop: -1
    first_of_client: bool = False  # closed loop: the client's first request (warm-up)
    finished_s: float | None = None  # None while running, or when cut
    code: str = CUT  # gRPC status name, OK, or CUT
    queued_s: float | None = None  # server-reported: accepted -> first denoising step
    compute_s: float | None = None  # server-reported: first step -> images decoded
    mean_batch_size: float | None = None  # server-reported rows per step it ran in

    @property
    def ok(self) -> bool:
        return self.code == OK

    @property
    def latency_s(self) -> float | None:
        if self.finished_s is None:
            return None
        return self.finished_s - self.issued_s


@dataclass(slots=True)
class LatencySummary:
    """Latency percentiles in seconds; None when the percentile lies among unfinished requests."""

    count: int  # finished requests
    unfinished: int  # cut off at the drain cap (count as infinitely slow)
    mean: float | None
    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None


@dataclass(slots=True)
class RunStats:
    """What one run measured."""

    throughput_ips: float  # images per second delivered (see the module docstring)
    window_throughput_ips: float  # completions inside the measurement window / its length
    window_s: float  # length of that window
    latency: LatencySummary
    latency_by_steps: dict[int, LatencySummary]  # per requested step count
    queue_mean_s: float | None  # mean server-reported queue time of the measured requests
    queue_mean_by_steps: dict[int, float | None]  # the same per requested step count
    compute_mean_s: float | None  # mean server-reported compute time of the measured requests
    issued: int  # every request the run sent
    failed: dict[str, int] = field(default_factory=dict)  # status name -> count (not OK, not cut)
    cut: int = 0  # requests the bench cancelled at the end of the run

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["latency_by_steps"] = {
            str(steps): asdict(summary) for steps, summary in self.latency_by_steps.items()
        }
        data["queue_mean_by_steps"] = {
            str(steps): value for steps, value in self.queue_mean_by_steps.items()
        }
        return data


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between order statistics, as
    numpy's default; None for no values; +inf values propagate (an unfinished request)."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside [0, 100]")
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    fraction = position - low
    if fraction == 0 or ordered[low] == ordered[high]:
        return ordered[low]
    if math.isinf(ordered[high]):
        return math.inf
    return ordered[low] + (ordered[high] - ordered[low]) * fraction


def summarize_latencies(finished: Iterable[float], unfinished: int = 0) -> LatencySummary:
    """Percentiles of finished latencies, with `unfinished` requests counted as infinitely slow."""
    done = list(finished)
    values = done + [math.inf] * unfinished

    def known(value: float | None) -> float | None:
        return None if value is None or math.isinf(value) else value

    return LatencySummary(
        count=len(done),
        unfinished=unfinished,
        mean=sum(done) / len(done) if done and not unfinished else None,
        p50=known(percentile(values, 50)),
        p95=known(percentile(values, 95)),
        p99=known(percentile(values, 99)),
        max=known(max(values)) if values else None,
    )


def mean(values: Iterable[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def closed_loop_stats(
    records: Sequence[RequestRecord], clients: int, warm_s: float, end_s: float
) -> RunStats:
    """Stats of a closed-loop run of `clients` clients that ended at `end_s`; [warm_s, end_s] is
    the window of `window_throughput_ips`."""
    in_window = [
        r for r in records if r.ok and r.finished_s is not None and warm_s <= r.finished_s <= end_s
    ]
    measured = [r for r in records if r.ok and not r.first_of_client]
    latencies = [r.latency_s for r in measured if r.latency_s is not None]
    throughput = clients / (sum(latencies) / len(latencies)) if latencies else 0.0
    window_s = end_s - warm_s
    window_throughput = len(in_window) / window_s if window_s > 0 else 0.0
    return _stats(records, measured, [], throughput, window_throughput, window_s)


def open_loop_stats(
    records: Sequence[RequestRecord], warm_s: float, arrivals_end_s: float
) -> RunStats:
    """Stats of an open-loop run: the requests that arrived after `warm_s`."""
    arrived = [r for r in records if r.issued_s >= warm_s]
    measured = [r for r in arrived if r.ok]
    unfinished = [r for r in arrived if r.code == CUT]
    throughput = 0.0
    done = [r for r in records if r.ok and r.finished_s is not None]
    if done:
        span = max(r.finished_s or 0.0 for r in done) - min(r.issued_s for r in records)
        throughput = len(done) / span if span > 0 else 0.0
    window_s = arrivals_end_s - warm_s
    in_window = [
        r
        for r in records
        if r.ok and r.finished_s is not None and warm_s <= r.finished_s <= arrivals_end_s
    ]
    window_throughput = len(in_window) / window_s if window_s > 0 else 0.0
    return _stats(records, measured, unfinished, throughput, window_throughput, window_s)


def _stats(
    records: Sequence[RequestRecord],
    measured: list[RequestRecord],
    unfinished: list[RequestRecord],
    throughput: float,
    window_throughput: float,
    window_s: float,
) -> RunStats:
    failed: dict[str, int] = {}
    for record in records:
        if not record.ok and record.code != CUT:
            failed[record.code] = failed.get(record.code, 0) + 1
    step_counts = sorted({r.steps for r in [*measured, *unfinished]})
    by_steps = {
        steps: summarize_latencies(
            [r.latency_s for r in measured if r.steps == steps and r.latency_s is not None],
            sum(1 for r in unfinished if r.steps == steps),
        )
        for steps in step_counts
    }
    return RunStats(
        throughput_ips=throughput,
        window_throughput_ips=window_throughput,
        window_s=window_s,
        latency=summarize_latencies(
            [r.latency_s for r in measured if r.latency_s is not None], len(unfinished)
        ),
        latency_by_steps=by_steps,
        queue_mean_s=mean(r.queued_s for r in measured),
        queue_mean_by_steps={
            steps: mean(r.queued_s for r in measured if r.steps == steps) for steps in step_counts
        },
        compute_mean_s=mean(r.compute_s for r in measured),
        issued=len(records),
        failed=failed,
        cut=sum(1 for r in records if r.code == CUT),
    )


RECORD_COLUMNS = (
    "index",
    "label",
    "client",
    "first_of_client",
    "issued_s",
    "finished_s",
    "code",
    "queued_s",
    "compute_s",
    "mean_batch_size",
)


def records_table(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """Every request of a run, compactly: column names and one row per request (for the JSON)."""

    def cell(value: Any) -> Any:
        return round(value, 4) if isinstance(value, float) else value

    return {
        "columns": list(RECORD_COLUMNS),
        "rows": [[cell(getattr(r, column)) for column in RECORD_COLUMNS] for r in records],
    }


def steps_of(label: str) -> int:
    """The step count in a request class's label (`RequestClass.label`).

    Raises:
        ValueError: the label has no `/STEPS`.
    """
    match = STEPS_IN_LABEL.search(label)
    if match is None:
        raise ValueError(f"request label {label!r} has no /STEPS")
    return int(match.group(1))


def records_from_table(table: dict[str, Any]) -> list[RequestRecord]:
    """The inverse of `records_table` (to recompute a run's stats from the JSON)."""
    columns = table["columns"]
    records = []
    for row in table["rows"]:
        values = dict(zip(columns, row, strict=True))
        label = values.pop("label")
        steps = steps_of(label)
        records.append(RequestRecord(steps=steps, label=label, **values))
    return records


def recompute_stats(run: dict[str, Any]) -> RunStats:
    """A run's stats from its stored records and parameters, as the run computed them."""
    records = records_from_table(run["records"])
    if run["kind"] == "closed":
        return closed_loop_stats(records, run["clients"], run["warm_s"], run["duration_s"])
    return open_loop_stats(records, run["warm_s"], run["arrivals_end_s"])
