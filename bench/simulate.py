"""The real scheduler on a simulated engine: what row selection does on other cost curves.

`python -m bench simulate` drives the server's `Scheduler` (pure Python) with a fake
clock: Poisson arrivals of a mix of step counts, one batch key, and a step that takes what a
cost curve says for its rows (with +-10% noise). It compares request-level batching, step-level
batching stepping every row (`--row-selection all`) and step-level batching with cost-aware row
selection (the default), at several loads, on curves the CPU bench cannot show:

- cpu: the bench preset on this machine's 2 cores (docs/benchmarks.md: 104, 173, 292, 501 ms
  for 1, 2, 4, 8 rows), 47 ms + 57 ms per row;
- linear: a model that fills the device with one row (Qwen-Image at 1024x1024 is 71 TFLOP per
  row-step, about 0.12 s on an H100), 10 ms + 120 ms per row: an assumption until measured;
- flat: a device with room to spare, 100 ms + 10 ms per row.

A second table starts closed loops of a few clients on an idle server (a burst): there the
mean latency follows the throughput, so it shows what holding rows back costs.

It runs in seconds, needs no torch, and prints two markdown tables.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from imagegen_server.base.request import Request
from imagegen_server.base.types import GenerationParams, OutputFormat
from imagegen_server.batching.plan import StepOutcome, StepPlan
from imagegen_server.batching.row_selection import CostLine
from imagegen_server.batching.scheduler import Scheduler, SchedulerConfig

from .cli import floats, ints, subset_of
from .cli import main as bench_main
from .stats import percentile

CURVES = {
    "cpu": CostLine(fixed_s=0.047, per_row_s=0.057),
    "linear": CostLine(fixed_s=0.010, per_row_s=0.120),
    "flat": CostLine(fixed_s=0.100, per_row_s=0.010),
}
POLICIES = ("request", "step-all", "step")
NOISE = 0.1  # each step takes its curve's time x uniform(1 - NOISE, 1 + NOISE)
# Closed loop: from a result to the client's next request (decode, encode, network, client).
TURNAROUND_S = 0.1
KEY = "1024x1024"


@dataclass(frozen=True, slots=True)
class Outcome:
    short_p95_s: float  # p95 latency of the requests with the fewest steps
    mean_s: float  # mean latency of all requests
    p95_s: float
    rows_per_step: float


@dataclass(frozen=True, slots=True)
class ClosedOutcome:
    throughput_ips: float  # requests finished within the run, per second
    mean_s: float  # their mean latency
    rows_per_step: float


def simulate(
    policy: str,
    curve: CostLine,
    load: float,
    requests: int,
    mix_steps: Sequence[int] = (4, 8),
    max_batch_size: int = 8,
    seed: int = 0,
) -> Outcome:
    """Runs `requests` Poisson arrivals at `load` x the curve's limit through the scheduler."""
    rng = random.Random(seed)
    limit = max_batch_size / (curve(max_batch_size) * statistics.mean(mix_steps))
    arrivals = _arrivals(rng, requests, load * limit, mix_steps)
    finished, rows_stepped = _drive(
        _scheduler(policy, max_batch_size), curve, rng, arrivals, lambda request, now: None
    )
    return _outcome(finished, mix_steps, rows_stepped)


def simulate_closed(
    policy: str,
    curve: CostLine,
    clients: int,
    duration_s: float,
    steps: int = 8,
    max_batch_size: int = 8,
    seed: int = 0,
) -> ClosedOutcome:
    """A burst on an idle server: `clients` clients start within the first second and each
    sends its next request `TURNAROUND_S` (+-50%) after its last one finished, until
    `duration_s`. By Little's law the mean latency follows the throughput here, so a policy
    that holds rows back can only lose if it loses throughput."""
    rng = random.Random(seed)
    counter = itertools.count()

    def request(at: float) -> Request:
        return _request(f"r{next(counter)}", steps, at)

    def next_request(finished: Request, now: float) -> Request | None:
        sent = now + TURNAROUND_S * rng.uniform(0.5, 1.5)
        return request(sent) if sent < duration_s else None

    first = [request(at) for at in sorted(rng.uniform(0, 1) for _ in range(clients))]
    finished, rows_stepped = _drive(
        _scheduler(policy, max_batch_size), curve, rng, first, next_request
    )
    in_run = [latency for request, latency in finished if request.arrival + latency <= duration_s]
    return ClosedOutcome(
        throughput_ips=len(in_run) / duration_s,
        mean_s=statistics.mean(in_run),
        rows_per_step=statistics.mean(rows_stepped),
    )


def _scheduler(policy: str, max_batch_size: int) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            policy="request" if policy == "request" else "step",
            max_batch_size=max_batch_size,
            max_queue_delay_s=0.005,
            max_active_batches=2,
            row_selection="cost" if policy == "step" else "all",
        )
    )


def _drive(
    scheduler: Scheduler,
    curve: CostLine,
    rng: random.Random,
    arrivals: list[Request],
    on_finish: Callable[[Request, float], Request | None],
) -> tuple[list[tuple[Request, float]], list[int]]:
    """Runs the scheduler on a fake clock until every request is done; `on_finish` may send a
    new request when one finishes. Returns (request, latency) in finishing order, and the rows
    of every step."""
    pending = sorted(arrivals, key=lambda request: request.arrival)
    finished: list[tuple[Request, float]] = []
    rows_stepped: list[int] = []
    now = 0.0
    while pending or scheduler.has_work():
        while pending and pending[0].arrival <= now:
            request = pending.pop(0)
            scheduler.add(request, request.arrival)
        plan = scheduler.plan(now)
        if plan.group is None:
            wake = [plan.wake_at] if plan.wake_at is not None else []
            upcoming = [pending[0].arrival] if pending else []
            if not upcoming + wake:
                raise RuntimeError("the scheduler holds work but plans nothing")
            now = max(now, min(upcoming + wake))
            continue
        outcome = _fake_step(scheduler, plan, curve, rng)
        now += outcome.seconds
        rows_stepped.append(outcome.rows)
        for request in scheduler.update(plan, outcome, now).finished:
            finished.append((request, now - request.arrival))
            follow_up = on_finish(request, now)
            if follow_up is not None:
                bisect.insort(pending, follow_up, key=lambda queued: queued.arrival)
    return finished, rows_stepped


def _fake_step(
    scheduler: Scheduler, plan: StepPlan, curve: CostLine, rng: random.Random
) -> StepOutcome:
    """What an engine on `curve` reports for `plan`'s step."""
    stepping = scheduler.stepping(plan)
    rows = sum(request.rows for request in stepping)
    return StepOutcome(
        rows=rows,
        seconds=curve(rows) * rng.uniform(1 - NOISE, 1 + NOISE),
        stepped=plan.stepped,
        finished=[request.ticket for request in stepping if request.remaining_steps == 1],
    )


def _outcome(
    finished: list[tuple[Request, float]], mix_steps: Sequence[int], rows_stepped: list[int]
) -> Outcome:
    everyone = [latency for _, latency in finished]
    shortest = [latency for request, latency in finished if request.steps == min(mix_steps)]
    return Outcome(
        short_p95_s=_p95(shortest),
        mean_s=statistics.mean(everyone),
        p95_s=_p95(everyone),
        rows_per_step=statistics.mean(rows_stepped),
    )


def _arrivals(
    rng: random.Random, count: int, rate: float, mix_steps: Sequence[int]
) -> list[Request]:
    requests, at = [], 0.0
    for index in range(count):
        at += rng.expovariate(rate)
        steps = rng.choice(list(mix_steps))
        requests.append(_request(f"r{index}", steps, at))
    return requests


def _request(ticket: str, steps: int, at: float) -> Request:
    """A one-image request of `steps` steps arriving at `at` (the scheduler reads no more)."""
    params = GenerationParams(
        request_id=ticket,
        prompt="",
        negative_prompt="",
        width=1024,
        height=1024,
        steps=steps,
        guidance_scale=1.0,
        seed=0,
        num_images=1,
        output_format=OutputFormat.PNG,
        output_quality=90,
    )
    return Request(ticket, params, KEY, arrival=at)


def _p95(values: list[float]) -> float:
    value = percentile(values, 95)
    assert value is not None, "no finished requests"
    return value


def table(curves: Sequence[str], loads: Sequence[float], requests: int, seed: int = 0) -> list[str]:
    lines = [
        "| curve | load | policy | short p95 s | x request-level | mean s | p95 s | rows/step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for curve in curves:
        for load in loads:
            outcomes = {
                policy: simulate(policy, CURVES[curve], load, requests, seed=seed)
                for policy in POLICIES
            }
            baseline = outcomes["request"].short_p95_s
            for policy, o in outcomes.items():
                lines.append(
                    f"| {curve} | {load:.0%} | {policy} | {o.short_p95_s:.2f} | "
                    f"{o.short_p95_s / baseline:.2f} | {o.mean_s:.2f} | {o.p95_s:.2f} | "
                    f"{o.rows_per_step:.2f} |"
                )
    return lines


def closed_table(
    curves: Sequence[str], clients: Sequence[int], durations: Sequence[float], seed: int = 0
) -> list[str]:
    lines = [
        "| curve | clients | seconds | policy | img/s | mean s | x step-all mean | rows/step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for curve in curves:
        for count in clients:
            for duration in durations:
                outcomes = {
                    policy: simulate_closed(policy, CURVES[curve], count, duration, seed=seed)
                    for policy in POLICIES
                }
                baseline = outcomes["step-all"].mean_s
                for policy, o in outcomes.items():
                    lines.append(
                        f"| {curve} | {count} | {duration:g} | {policy} | {o.throughput_ips:.2f} | "
                        f"{o.mean_s:.2f} | {o.mean_s / baseline:.3f} | {o.rows_per_step:.2f} |"
                    )
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--curves",
        type=subset_of(list(CURVES)),
        default=",".join(CURVES),
        help="subset of cpu,linear,flat",
    )
    parser.add_argument(
        "--loads", type=floats, default="0.3,0.5,0.8,0.95", help="fractions of the limit"
    )
    parser.add_argument("--requests", type=int, default=3000, help="arrivals per simulation")
    parser.add_argument(
        "--closed-clients",
        type=ints,
        default="4,8",
        help="closed loops from a cold start; empty = none",
    )
    parser.add_argument(
        "--closed-seconds", type=floats, default="10,30,120", help="how long each closed loop runs"
    )
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    print("\n".join(table(args.curves, args.loads, args.requests, args.seed)))
    if args.closed_clients:
        lines = closed_table(args.curves, args.closed_clients, args.closed_seconds, args.seed)
        print("\n" + "\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m bench simulate ARGV`, for callers that run this command alone."""
    return bench_main(["simulate", *(argv or [])])
