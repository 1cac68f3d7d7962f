"""Tenants under contention: the real scheduler's fair share against first come first served.

`python -m bench tenants` drives the server's `Scheduler` on a fake clock and a simulated engine
(bench/simulate.py's cost curves): tenants A (weight 1) and B (weight 3) each run closed loops
of clients that together ask for more than the engine does, and tenant C (weight 1) starts its
own loops halfway through. The same arrivals run twice: once with every request billed to one
tenant (what the scheduler did before fair share: first come first served), once with the
tenants and weights of the tokens file. For each it prints every tenant's share of the images
finished in each window and its p95 latency, and how long C's first request waited.

It runs in seconds and needs no torch: the numbers are the scheduler's, the engine is a model.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import random
from collections import Counter
from dataclasses import dataclass, field

from imagegen_server.base.request import Request
from imagegen_server.batching.row_selection import CostLine
from imagegen_server.batching.scheduler import Scheduler, SchedulerConfig

from .cli import main as bench_main
from .simulate import CURVES, TURNAROUND_S, _drive, _request
from .stats import percentile

WEIGHTS = {"A": 1.0, "B": 3.0, "C": 1.0}


@dataclass(slots=True)
class Run:
    finished: list[tuple[Request, float]] = field(default_factory=list)  # request, latency
    first_wait_c: float = 0.0  # C's first request: seconds from arrival to its end


def simulate_tenants(
    fair: bool,
    curve: CostLine,
    clients: int,
    duration_s: float,
    steps: int = 8,
    max_batch_size: int = 4,
    seed: int = 0,
) -> Run:
    """`clients` closed loops per tenant; C's start at `duration_s / 2`."""
    rng = random.Random(seed)
    counter = itertools.count()
    late = duration_s / 2

    def request(tenant: str, at: float) -> Request:
        made = _request(f"{tenant}{next(counter)}", steps, at)
        made.tenant, made.weight = (tenant, WEIGHTS[tenant]) if fair else ("", 1.0)
        made.params = dataclasses.replace(made.params, request_id=tenant)  # who, in both runs
        return made

    def next_request(finished: Request, now: float) -> Request | None:
        sent = now + TURNAROUND_S * rng.uniform(0.5, 1.5)
        return request(finished.request_id, sent) if sent < duration_s else None

    first = [
        request(tenant, start + rng.uniform(0, 1))
        for tenant, start in (("A", 0.0), ("B", 0.0), ("C", late))
        for _ in range(clients)
    ]
    scheduler = Scheduler(SchedulerConfig(max_batch_size=max_batch_size))
    finished, _ = _drive(scheduler, curve, rng, first, next_request)
    waits_c = [latency for req, latency in finished if req.request_id == "C"]
    return Run(finished, first_wait_c=min(waits_c, default=0.0))


def shares(run: Run, window_s: float, duration_s: float) -> list[Counter[str]]:
    """Images finished per tenant in each window of `window_s`."""
    windows: list[Counter[str]] = [Counter() for _ in range(int(duration_s // window_s))]
    for request, latency in run.finished:
        index = int((request.arrival + latency) // window_s)
        if index < len(windows):
            windows[index][request.request_id] += request.rows
    return windows


def table(clients: int, duration_s: float, window_s: float, curve: str, seed: int) -> list[str]:
    lines = [
        "| scheduler | window | A (w1) | B (w3) | C (w1, late) | p95 A / B / C (s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for fair in (False, True):
        run = simulate_tenants(fair, CURVES[curve], clients, duration_s, seed=seed)
        p95 = " / ".join(f"{_p95(run, tenant):.1f}" for tenant in "ABC")
        name = "fair share" if fair else "first come first served"
        for index, window in enumerate(shares(run, window_s, duration_s)):
            total = sum(window.values()) or 1
            cells = " | ".join(f"{window[tenant] / total:.0%}" for tenant in "ABC")
            span = f"{index * window_s:g}-{(index + 1) * window_s:g} s"
            lines.append(f"| {name} | {span} | {cells} | {p95 if index == 0 else ''} |")
        lines.append(f"| {name} | C's first request took | | | {run.first_wait_c:.1f} s | |")
    return lines


def _p95(run: Run, tenant: str) -> float:
    latencies = [latency for request, latency in run.finished if request.request_id == tenant]
    return percentile(latencies, 95) or 0.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=8, help="closed loops per tenant")
    parser.add_argument("--seconds", type=float, default=120.0, help="simulated duration")
    parser.add_argument("--window", type=float, default=20.0, help="seconds per share window")
    parser.add_argument("--curve", choices=list(CURVES), default="linear")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    print("\n".join(table(args.clients, args.seconds, args.window, args.curve, args.seed)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m bench tenants ARGV`, for callers that run this command alone."""
    return bench_main(["tenants", *(argv or [])])
