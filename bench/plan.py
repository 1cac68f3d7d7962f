"""How long each run lasts: sized from the measured limit so the whole bench fits its budget on
any machine (a faster engine gets shorter runs with the same number of samples).

A closed loop with N clients sends N requests at once; each client's first request is a warm-up
(it waited behind everyone else's) and its later ones see the steady state. They first complete
about one cycle, N / rate seconds, in; batches of up to B rows finish together, so the run goes
on for a window that holds a fixed number of completions and at least two such bursts. The rate
used for sizing is discounted so a server slower than its estimate still fills the window.

An open loop sends a fixed number of Poisson arrivals at a fraction of the limit, so every system
sees exactly the same arrival times, then waits at most a drain cap for what is still queued.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .loads import ClosedLoop, OpenLoop


@dataclass(frozen=True, slots=True)
class Sizing:
    """Run lengths; `FULL` for `make bench`, `QUICK` for a smoke check."""

    closed_min_warm_s: float  # closed loop: warm-up at least this long ...
    closed_warm_cycles: float  # ... and at least this many cycles of N / expected rate
    closed_window_images: int  # completions the window aims to collect ...
    closed_window_bursts: float  # ... and batches finishing together (min(N, B) images each)
    closed_min_window_s: float
    rate_discount: float  # the expected rate is multiplied by this for sizing
    closed_overrun: float  # a closed loop short of samples may run this many times its plan
    open_warm_s: float  # open loop: arrivals before this are not measured
    open_arrival_s: float  # arrivals span about this long
    open_min_arrivals: int
    open_drain_cap_s: float  # longest wait for the backlog after the last arrival
    headline_arrivals: int  # arrivals of the open-loop run behind the mix target

    def scaled(self, factor: float) -> Sizing:
        """Shorter windows, arrival spans and drain caps (factor < 1), within floors that keep
        every run meaningful; warm-ups, which a steady state needs, are not touched."""
        return dataclasses.replace(
            self,
            closed_window_images=max(5, round(self.closed_window_images * factor)),
            closed_window_bursts=max(1.5, self.closed_window_bursts * factor),
            closed_min_window_s=max(2.5, self.closed_min_window_s * factor),
            open_arrival_s=max(4.0, self.open_arrival_s * factor),
            open_drain_cap_s=max(5.0, self.open_drain_cap_s * factor),
        )


FULL = Sizing(
    closed_min_warm_s=2.0,
    closed_warm_cycles=1.0,
    closed_window_images=10,
    closed_window_bursts=2.2,
    closed_min_window_s=4.0,
    rate_discount=0.95,
    closed_overrun=1.6,
    open_warm_s=1.5,
    open_arrival_s=9.0,
    open_min_arrivals=10,
    open_drain_cap_s=8.0,
    headline_arrivals=40,
)
QUICK = Sizing(
    closed_min_warm_s=1.0,
    closed_warm_cycles=1.0,
    closed_window_images=6,
    closed_window_bursts=1.5,
    closed_min_window_s=3.0,
    rate_discount=0.85,
    closed_overrun=1.6,
    open_warm_s=1.0,
    open_arrival_s=5.0,
    open_min_arrivals=5,
    open_drain_cap_s=5.0,
    headline_arrivals=12,
)


@dataclass(frozen=True, slots=True)
class ClosedPlan:
    load: ClosedLoop
    warm_s: float  # the window is [warm_s, load.duration_s]


@dataclass(frozen=True, slots=True)
class OpenPlan:
    load: OpenLoop
    fraction: float  # of the workload's limit
    warm_s: float


def closed_plan(clients: int, expected_ips: float, max_batch: int, sizing: Sizing) -> ClosedPlan:
    """`expected_ips`: roughly what the system under test delivers; `max_batch`: the most
    images it finishes at once (1 for the naive server). Both only size the run."""
    rate = sizing.rate_discount * expected_ips
    warm = max(sizing.closed_min_warm_s, sizing.closed_warm_cycles * clients / rate)
    burst = min(clients, max_batch)
    window = max(
        sizing.closed_min_window_s,
        sizing.closed_window_images / rate,
        sizing.closed_window_bursts * burst / rate,
    )
    duration = warm + window
    load = ClosedLoop(
        clients=clients,
        duration_s=duration,
        min_samples=min(clients, burst * 2, sizing.closed_window_images),
        max_duration_s=duration * sizing.closed_overrun,
    )
    return ClosedPlan(load, warm_s=warm)


def open_plan(
    fraction: float, limit_ips: float, sizing: Sizing, headline: bool = False
) -> OpenPlan:
    """`headline`: the run a target reads percentiles of a subset from; it gets more arrivals."""
    rate = fraction * limit_ips
    arrivals = max(sizing.open_min_arrivals, round(rate * sizing.open_arrival_s))
    if headline:
        arrivals = max(arrivals, sizing.headline_arrivals)
    return OpenPlan(
        OpenLoop(rate_ips=rate, arrivals=arrivals, drain_cap_s=sizing.open_drain_cap_s),
        fraction=fraction,
        warm_s=sizing.open_warm_s,
    )


def estimate_closed_s(plan: ClosedPlan) -> float:
    return plan.load.duration_s


def estimate_open_s(plan: OpenPlan, capacity_ips: float) -> float:
    """Arrival time plus the backlog left at the end, bounded by the drain cap."""
    load = plan.load
    arrival_s = load.arrivals / load.rate_ips
    backlog = max(0.0, load.arrivals - capacity_ips * arrival_s)
    return arrival_s + min(load.drain_cap_s, backlog / capacity_ips + 1 / capacity_ips)
