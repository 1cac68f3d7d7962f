"""Cost-aware row selection: which requests of a running batch take its next step.

Continuous batching steps every row of a batch together. That is right where a step of many
rows costs little more than a step of one (a GPU with room to spare at a small size), and wrong
where the cost grows with the rows (Qwen-Image at 1024x1024 fills an H100 with one row; a CPU):
there, a 4-step request that joins 8-step ones pays for their rows at each of its steps, and
finishing requests in order of remaining work (shortest remaining processing time first) gives
a lower mean latency at the same throughput.

So the server measures what a step costs by rows, per batch key (`StepCosts`), and before each
step of an uncontested batch picks how many requests step, in order, such that the running
requests' total completion time, plus the delay the plan's extra work would cause to requests
arriving meanwhile (weighed by how busy the engine is), is least (`rows_to_step`, applied by
`pick_rows`). On a flat cost curve that is always every row. Pure Python: no torch, no clock.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from ..base.request import Request

# Weight of the work a smaller step adds, per request expected to arrive during the plan. The
# backlog it causes outlives the plan under load, hence more than 1. Simulated open loops
# (Poisson arrivals; 4- and 8-step requests; CPU-like, linear and flat cost curves) placed 2
# best: 1 favoured short requests at the expense of the mean at 80% load, 4 gave up most of the
# gain at 50%.
THROUGHPUT_WEIGHT = 2.0
# The busy share the load pressure is read at, at most: beyond it, pressure stops growing.
MAX_BUSY_SHARE = 0.95
# Step times kept per row count; their median is the count's cost. A median, not a running
# mean: one step slowed by something else on the machine (seen on the 2-core bench: 0.58 s and
# 1.15 s among 4-row steps of 0.3 s, as a closed loop ended) moved a mean by a fifth of the
# spike and held it there while rows were held back, since the count it inflated stopped
# running.
COST_SAMPLES = 9
# Window over which arrivals and the engine's busy time are counted.
RATE_WINDOW_S = 30.0
# A gap this long between arrivals (or busy periods) starts the count afresh: the load changed.
PAUSE_S = 5.0
# Shortest time a rate is taken over: requests arriving together are not an infinite rate.
MIN_SPAN_S = 1.0


@dataclass(frozen=True, slots=True)
class CostLine:
    """Seconds of one denoising step: `fixed_s + per_row_s * rows`."""

    fixed_s: float
    per_row_s: float

    def __call__(self, rows: int) -> float:
        return self.fixed_s + self.per_row_s * rows


class StepCosts:
    """Measured seconds per step by rows, per batch key: the median of the last `COST_SAMPLES`
    step times of every row count that ran, and the least-squares line through those medians
    (known once two counts have run)."""

    def __init__(self) -> None:
        self._samples: dict[Hashable, dict[int, deque[float]]] = {}

    def observe(self, key: Hashable, rows: int, seconds: float) -> None:
        by_rows = self._samples.setdefault(key, {})
        by_rows.setdefault(rows, deque(maxlen=COST_SAMPLES)).append(seconds)

    def line(self, key: Hashable) -> CostLine | None:
        by_rows = self._samples.get(key, {})
        if len(by_rows) < 2:
            return None
        medians = {rows: statistics.median(samples) for rows, samples in by_rows.items()}
        mean_rows = sum(medians) / len(medians)
        mean_s = sum(medians.values()) / len(medians)
        spread = sum((rows - mean_rows) ** 2 for rows in medians)
        slope = sum((rows - mean_rows) * (s - mean_s) for rows, s in medians.items()) / spread
        # A cost never falls with more rows, nor below zero: measurement noise can say otherwise.
        per_row = max(0.0, slope)
        return CostLine(fixed_s=max(0.0, mean_s - per_row * mean_rows), per_row_s=per_row)


class RecentRate:
    """Requests accepted per second over the last `RATE_WINDOW_S` seconds, or since they resumed
    after a pause of `PAUSE_S` if that is shorter.

    A fixed window lags a change of load by its length: a burst on an idle server would read as
    a trickle for half a minute, and row selection, seeing no load to protect, would trade away
    throughput the burst needs. What came before a pause belongs to the old load and is dropped.
    """

    def __init__(self) -> None:
        self._times: deque[float] = deque()
        self._since = 0.0  # when arrivals resumed after the last pause

    def add(self, at: float) -> None:
        if not self._times or at - self._times[-1] > PAUSE_S:
            self._times.clear()
            self._since = at
        self._times.append(at)
        self._forget(at)

    def per_second(self, now: float) -> float:
        self._forget(now)
        observed = min(RATE_WINDOW_S, max(now - self._since, MIN_SPAN_S))
        return len(self._times) / observed

    def _forget(self, now: float) -> None:
        while self._times and self._times[0] <= now - RATE_WINDOW_S:
            self._times.popleft()


class BusyShare:
    """The share of the time the engine was busy, over the last `RATE_WINDOW_S` seconds or since
    it resumed after an idle gap of `PAUSE_S`, whichever is shorter.

    Unlike a rate of arrivals, a share is bounded, so it needs no shortest span: an engine that
    has not stopped since a burst began reads 1 as soon as its first step is done. (Read over at
    least a second, a burst's first steps read as a light load, and rows were held back there.)
    """

    def __init__(self) -> None:
        self._periods: deque[tuple[float, float]] = deque()  # (start, end), in order
        self._since = 0.0  # when the engine resumed after the last idle gap

    def add(self, start: float, end: float) -> None:
        """The engine was busy from `start` to `end`."""
        if not self._periods or start - self._periods[-1][1] > PAUSE_S:
            self._periods.clear()
            self._since = start
        self._periods.append((start, end))
        self._forget(self._window_start(end))  # bounded even if nobody reads the share

    def share(self, now: float) -> float:
        """Busy seconds per second; 0 before anything ran."""
        begin = self._window_start(now)
        self._forget(begin)
        if not self._periods or now <= begin:
            return 0.0
        busy = sum(min(end, now) - max(start, begin) for start, end in self._periods)
        return busy / (now - begin)

    def _window_start(self, now: float) -> float:
        return max(self._since, now - RATE_WINDOW_S)

    def _forget(self, begin: float) -> None:
        while self._periods and self._periods[0][1] <= begin:
            self._periods.popleft()


def pick_rows(
    members: Sequence[Request],
    cost: CostLine,
    now: float,
    arrivals_per_s: float,
    busy_share: float,
) -> list[Request]:
    """The requests of a running batch (`members`) that run its next step.

    Requests that must step (`must_step`) go first, then by priority and fewest remaining
    steps; `rows_to_step` decides how many of them, in that order, step.
    """
    rows = sum(request.rows for request in members)
    must = {request.ticket for request in members if must_step(request, cost, rows, now)}
    ordered = sorted(
        members, key=lambda r: (r.ticket not in must, r.priority, r.remaining_steps, r.rank)
    )
    candidates = [Candidate(request.rows, request.remaining_steps) for request in ordered]
    take = rows_to_step(candidates, cost, arrivals_per_s, busy_share)
    return ordered[: max(take, len(must))]


def must_step(request: Request, cost: CostLine, rows: int, now: float) -> bool:
    """A request sits out at most as many steps as it has (its compute time at most about
    doubles), and none whose deadline leaves less than twice its remaining time at the current
    batch's step cost (`rows` rows)."""
    if request.deferred_steps >= request.steps:
        return True
    if request.deadline is None:
        return False
    return request.deadline - now < 2 * request.remaining_steps * cost(rows)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A running request as row selection sees it: all its rows step together or none do."""

    rows: int
    remaining_steps: int


def rows_to_step(
    candidates: Sequence[Candidate], cost: CostLine, arrivals_per_s: float, busy_share: float
) -> int:
    """How many of `candidates`, taken in order, run the next step (1..len).

    `candidates` come in the order they should run (the caller puts those that must step
    first, then by priority and remaining steps). Each choice `take` is judged by its plan: the
    first `take` unfinished candidates step together until one finishes, again and again. The
    choice minimises the plan's sum of completion times plus THROUGHPUT_WEIGHT x the load
    pressure x the requests expected to arrive meanwhile x the extra time the plan takes over
    stepping everyone. Ties go to more rows.

    The pressure is busy / (1 - busy), from the engine's recent busy share: 1 at half busy, where
    the weight was tuned, and growing as the engine nears saturation, where queueing delay grows
    the same way with any extra work. A few clients that each send their next request as soon
    as the last one returns keep the engine busy all the time; finishing one of them early only
    brings its next request early, so there row selection must not cost throughput at all.
    """
    busy = min(busy_share, MAX_BUSY_SHARE)
    weight = THROUGHPUT_WEIGHT * busy / (1 - busy) * arrivals_per_s
    everyone = len(candidates)
    total_all, span_all = _plan(candidates, everyone, cost)
    best_take, best_score = everyone, total_all
    for take in range(1, everyone):
        total, span = _plan(candidates, take, cost)
        score = total + weight * span_all * (span - span_all)
        if score < best_score * (1 - 1e-9):
            best_take, best_score = take, score
    return best_take


def _plan(candidates: Sequence[Candidate], take: int, cost: CostLine) -> tuple[float, float]:
    """(sum of completion times, time until all finish) when the first `take` unfinished
    candidates step together until one of them finishes, repeatedly."""
    remaining = [candidate.remaining_steps for candidate in candidates]
    unfinished = [index for index, steps in enumerate(remaining) if steps > 0]
    elapsed = total = 0.0
    while unfinished:
        stepping = unfinished[:take]
        steps = min(remaining[index] for index in stepping)
        elapsed += steps * cost(sum(candidates[index].rows for index in stepping))
        for index in stepping:
            remaining[index] -= steps
        total += elapsed * sum(1 for index in stepping if remaining[index] == 0)
        unfinished = [index for index in unfinished if remaining[index] > 0]
    return total, elapsed
