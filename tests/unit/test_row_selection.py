"""Cost-aware row selection on its own and inside the scheduler: a fake clock, no torch."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from imagegen_server.base.request import Request
from imagegen_server.batching.plan import StepOutcome
from imagegen_server.batching.row_selection import (
    COST_SAMPLES,
    MIN_SPAN_S,
    PAUSE_S,
    RATE_WINDOW_S,
    BusyShare,
    Candidate,
    CostLine,
    RecentRate,
    StepCosts,
    rows_to_step,
)
from imagegen_server.batching.scheduler import Scheduler, SchedulerConfig
from support import scheduled_request

LINEAR = CostLine(fixed_s=0.0, per_row_s=1.0)  # a large DiT at 1024x1024: rows cost alike
FLAT = CostLine(fixed_s=1.0, per_row_s=0.0)  # a GPU with room to spare: rows are free
_ids = itertools.count()


def candidates(*remaining: int) -> list[Candidate]:
    return [Candidate(rows=1, remaining_steps=steps) for steps in remaining]


def test_the_cost_line_is_unknown_until_two_row_counts_ran() -> None:
    costs = StepCosts()
    costs.observe("A", 2, 0.5)
    costs.observe("A", 2, 0.5)
    assert costs.line("A") is None
    costs.observe("A", 4, 0.9)
    line = costs.line("A")
    assert line is not None
    assert line.per_row_s == pytest.approx(0.2) and line.fixed_s == pytest.approx(0.1)
    assert costs.line("B") is None  # every key has its own curve


def test_the_cost_line_never_falls_with_rows() -> None:
    costs = StepCosts()
    costs.observe("A", 1, 0.5)
    costs.observe("A", 8, 0.4)  # noise
    assert costs.line("A") == CostLine(fixed_s=pytest.approx(0.45), per_row_s=0.0)


def test_one_slow_step_does_not_move_the_cost_line() -> None:
    # Measured on the 2-core bench: 4-row steps of about 0.3 s, and one of 1.15 s as a closed
    # loop ended and something else took the CPU. A running mean kept a fifth of that spike.
    costs = StepCosts()
    for _ in range(COST_SAMPLES):
        costs.observe("A", 1, 0.08)
        costs.observe("A", 4, 0.20)
    before = costs.line("A")
    costs.observe("A", 4, 1.15)
    assert costs.line("A") == before
    for _ in range(COST_SAMPLES // 2 + 1):  # a lasting change is followed within a few steps
        costs.observe("A", 4, 0.32)
    line = costs.line("A")
    assert line is not None and line.per_row_s == pytest.approx(0.08)


def test_arrivals_are_counted_over_a_window() -> None:
    rate = RecentRate()
    for at in range(2 * int(RATE_WINDOW_S)):  # one a second
        rate.add(float(at))
    last = 2 * RATE_WINDOW_S - 1
    assert rate.per_second(last) == pytest.approx(1.0)  # a full window, one a second
    assert rate.per_second(last + RATE_WINDOW_S / 2) == pytest.approx(0.5)  # half are old


def test_a_burst_after_a_pause_is_read_at_its_own_rate() -> None:
    rate = RecentRate()
    for at in range(10):  # one a second, then quiet
        rate.add(float(at))
    assert rate.per_second(9.0) == pytest.approx(10 / 9)  # less than a window observed yet
    for at in (40.0, 40.1, 40.2, 40.3):  # four clients start together
        rate.add(at)
    assert rate.per_second(40.5) == pytest.approx(4 / MIN_SPAN_S)  # not an infinite rate
    # A window-only count would say 4 / 30 s, as if the burst were a trickle.
    assert rate.per_second(42.0) == pytest.approx(4 / 2)


def test_on_a_linear_curve_the_nearly_done_request_steps_alone() -> None:
    # One request with 1 step left and three with 8: finishing it first saves 3 row-steps of
    # waiting and costs the others 1 step each of nothing (the total work is the same).
    assert rows_to_step(candidates(1, 8, 8, 8), LINEAR, arrivals_per_s=0.0, busy_share=0.5) == 1


def test_on_a_flat_curve_every_row_steps() -> None:
    assert rows_to_step(candidates(1, 8, 8, 8), FLAT, arrivals_per_s=0.0, busy_share=0.5) == 4


def test_under_heavy_arrivals_every_row_steps() -> None:
    # With a fixed cost per call, smaller steps add work; enough arrivals make it not worth it.
    cpu_like = CostLine(fixed_s=0.05, per_row_s=0.06)
    assert rows_to_step(candidates(4, 8, 8, 8), cpu_like, arrivals_per_s=0.0, busy_share=0.5) < 4
    assert rows_to_step(candidates(4, 8, 8, 8), cpu_like, arrivals_per_s=50.0, busy_share=0.5) == 4


def test_an_engine_busy_all_the_time_keeps_every_row_stepping() -> None:
    # Four equal requests on a nearly linear curve (this CPU at 256x256 measured 14 ms + 49 ms
    # per row): two pairs one after the other finish the first pair much sooner. With the
    # engine half idle that is worth it; busy all the time (a few clients sending back to
    # back), the pair finished first only comes back sooner to wait, and the throughput the
    # pairs give up is lost for good.
    nearly_linear = CostLine(fixed_s=0.014, per_row_s=0.049)
    equal = candidates(6, 6, 6, 6)
    assert rows_to_step(equal, nearly_linear, arrivals_per_s=2.0, busy_share=0.5) == 2
    assert rows_to_step(equal, nearly_linear, arrivals_per_s=2.0, busy_share=1.0) == 4


def test_busy_time_reads_as_a_share_of_the_time() -> None:
    busy = BusyShare()
    assert busy.share(1.0) == 0.0  # nothing ran yet
    busy.add(0.0, 0.2)
    # Once the first step is done: a share has no shortest span (over a second this was 0.2).
    assert busy.share(0.2) == pytest.approx(1.0)
    for step in range(1, 50):  # back to back steps of 0.2 s
        busy.add(0.2 * step, 0.2 * step + 0.2)
    assert busy.share(10.0) == pytest.approx(1.0)
    busy.add(10.5, 10.7)  # then about half the time
    busy.add(10.9, 11.1)
    assert busy.share(11.1) == pytest.approx((50 * 0.2 + 0.4) / 11.1)


def test_busy_time_is_counted_over_a_window() -> None:
    busy = BusyShare()
    busy.add(0.0, 40.0)  # one long busy stretch, then half the time
    for start in range(40, 46, 2):
        busy.add(float(start), start + 1.0)
    # A window that cuts a busy period counts only its part inside: 15..40, then 3 x 1 s.
    assert busy.share(45.0) == pytest.approx((25.0 + 3) / 30)
    for start in range(46, 80, 2):
        busy.add(float(start), start + 1.0)
    # The last 30 s: 50..80, busy 1 s in every 2 (the stretch before is forgotten).
    assert busy.share(80.0) == pytest.approx(0.5)


def test_busy_periods_are_forgotten_even_when_nobody_reads_the_share() -> None:
    # Under steady queueing (or --row-selection all) the share is never read; a server busy
    # for days must not keep every step it ran.
    busy = BusyShare()
    for step in range(10_000):  # back to back steps of 0.1 s: 1000 s
        busy.add(0.1 * step, 0.1 * step + 0.1)
    assert len(busy._periods) <= RATE_WINDOW_S / 0.1 + 1


def test_an_idle_gap_starts_the_busy_share_afresh() -> None:
    busy = BusyShare()
    for start in range(0, 20, 4):  # a quarter of the time
        busy.add(float(start), start + 1.0)
    assert busy.share(20.0) == pytest.approx(0.25)
    busy.add(20.0 + PAUSE_S + 1, 20.0 + PAUSE_S + 1.3)  # a burst after a pause
    assert busy.share(20.0 + PAUSE_S + 1.3) == pytest.approx(1.0)


@example(periods=[(0.0, 1.7)] * 30, read_after=0.0)  # busy throughout, windows cut steps
@settings(max_examples=200, deadline=None)
@given(
    # Mostly busy, now and then idle past PAUSE_S: shares near 1, windows cutting periods.
    periods=st.lists(
        st.tuples(st.sampled_from([0.0, 0.1, 0.5, 6.0]), st.floats(0.0, 3.0)), max_size=60
    ),
    read_after=st.floats(0.0, 40.0),
)
def test_the_busy_share_is_always_a_share(
    periods: list[tuple[float, float]], read_after: float
) -> None:
    busy = BusyShare()
    now = 0.0
    for idle, length in periods:  # idle, then busy, one after the other
        busy.add(now + idle, now + idle + length)
        now += idle + length
        assert 0.0 <= busy.share(now) <= 1.0 + 1e-9
    assert 0.0 <= busy.share(now + read_after) <= 1.0 + 1e-9


@settings(max_examples=200, deadline=None)
@given(
    remaining=st.lists(st.integers(1, 50), min_size=1, max_size=8),
    fixed=st.floats(0.0, 1.0),
    per_row=st.floats(0.0, 1.0),
    arrivals=st.floats(0.0, 100.0),
    busy=st.floats(0.0, 1.0),
)
def test_the_choice_is_always_a_valid_prefix(
    remaining: list[int], fixed: float, per_row: float, arrivals: float, busy: float
) -> None:
    take = rows_to_step(candidates(*remaining), CostLine(fixed, per_row), arrivals, busy)
    assert 1 <= take <= len(remaining)
    if per_row == 0.0:  # nothing to gain from smaller steps
        assert take == len(remaining)


# --- inside the scheduler ---


def linear_scheduler(**overrides: object) -> Scheduler:
    config = {"policy": "step", "max_batch_size": 8, "row_selection": "cost", **overrides}
    scheduler = Scheduler(SchedulerConfig(**config))  # type: ignore[arg-type]
    for rows in (1, 2, 4, 8):  # measured: every row costs 0.1 s
        scheduler.costs.observe("A", rows, 0.1 * rows)
    return scheduler


def request(
    steps: int, at: float = 0.0, priority: int = 1, deadline: float | None = None
) -> Request:
    return scheduled_request(
        f"r{next(_ids)}", at=at, steps=steps, priority=priority, deadline=deadline
    )


def start(scheduler: Scheduler, *requests: Request) -> None:
    for request in requests:
        scheduler.add(request, request.arrival)
    plan = scheduler.plan(0.0)
    assert {r.ticket for r in plan.admitted} == {r.ticket for r in requests}


def run_step(scheduler: Scheduler, now: float, step_s: float = 0.1) -> list[str]:
    """Plans and runs one step like the batcher, on an engine whose rows cost `step_s` each;
    returns who stepped."""
    plan = scheduler.plan(now)
    stepping = scheduler.stepping(plan)
    rows = sum(r.rows for r in stepping)
    finished = [r.ticket for r in stepping if r.remaining_steps == 1]
    outcome = StepOutcome(rows, step_s * rows, plan.stepped, finished)
    scheduler.update(plan, outcome, now)
    return [r.ticket for r in stepping]


def test_a_short_request_runs_ahead_of_long_ones_on_a_linear_curve(
    caplog: pytest.LogCaptureFixture,
) -> None:
    scheduler = linear_scheduler()
    long_ones = [request(8) for _ in range(3)]
    short = request(2)
    start(scheduler, *long_ones, short)
    with caplog.at_level("DEBUG", logger="imagegen_server.batching.scheduler"):
        assert run_step(scheduler, 0.1) == [short.ticket]
    assert "1 of 4 requests step: 0.000 s + 0.100 s per row" in caplog.text  # and why
    assert run_step(scheduler, 0.2) == [short.ticket]
    assert scheduler.running_count == 3  # the short one is done after its 2 steps
    assert long_ones[0].deferred_steps == 2


def test_every_row_steps_while_requests_wait() -> None:
    scheduler = linear_scheduler(max_batch_size=2)
    start(scheduler, request(8), request(2))
    scheduler.add(request(8, at=0.05), 0.05)  # no room: it waits
    assert scheduler.plan(0.1).stepped is None


def test_every_row_steps_on_a_flat_curve() -> None:
    scheduler = linear_scheduler()
    for rows in (1, 2, 4, 8):
        scheduler.costs.observe("A", rows, 0.1)
        scheduler.costs.observe("A", rows, 0.1)
    for _ in range(30):  # the medians of recent steps forget the linear measurements
        scheduler.costs.observe("A", 1, 0.1)
        scheduler.costs.observe("A", 8, 0.1)
    start(scheduler, request(8), request(2))
    assert scheduler.costs.line("A") is not None
    assert scheduler.plan(0.1).stepped is None


def test_row_selection_all_steps_every_row() -> None:
    scheduler = linear_scheduler(row_selection="all")
    start(scheduler, request(8), request(2))
    assert scheduler.plan(0.1).stepped is None


@pytest.mark.parametrize("short_priority", [1, 2])
def test_priority_comes_before_fewer_steps(short_priority: int) -> None:
    """A request is never left out while one of lower priority steps."""
    scheduler = linear_scheduler()
    short = request(1, priority=short_priority)
    start(scheduler, request(8, priority=1), short)
    stepped = scheduler.plan(0.1).stepped
    # Equal priorities: the 1-step request runs alone. Lower: it cannot; both step.
    assert stepped == ([short.ticket] if short_priority == 1 else None)


def test_a_request_near_its_deadline_is_never_left_out() -> None:
    scheduler = linear_scheduler()
    # 8 steps to go at 0.2 s per step of both rows: 1.6 s; the deadline leaves 2.0 s (< 2x).
    tight = request(8, deadline=2.1)
    start(scheduler, tight, request(2))
    assert set(run_step(scheduler, 0.1)) >= {tight.ticket}


def test_a_long_request_sits_out_at_most_its_own_step_count() -> None:
    """A stream of short requests, each joining as the last one ends, never starves a long one:
    it is left out of at most as many steps as it has."""
    scheduler = linear_scheduler()
    long_one = request(4)
    start(scheduler, long_one, request(1))
    now = 0.0
    for _ in range(40):
        now += 0.1
        run_step(scheduler, now)
        if long_one.ticket not in {r.ticket for r in scheduler.running_in("A")}:
            break
        if scheduler.running_count == 1:  # the short one finished: the next arrives
            scheduler.add(request(1, at=now), now)
    assert long_one.steps_done == 4
    assert long_one.deferred_steps <= long_one.steps


def test_a_burst_on_an_idle_engine_steps_every_row_from_its_second_step() -> None:
    """Four clients start together on a nearly linear curve (this CPU: 14 ms + 49 ms per row).
    The first step knows nothing of the load; from the second on the engine has been busy all
    the time since the burst began, so no row is held back."""
    scheduler = Scheduler(SchedulerConfig(policy="step", max_batch_size=8, row_selection="cost"))
    cost = CostLine(fixed_s=0.014, per_row_s=0.049)
    for rows in (1, 2, 4):
        scheduler.costs.observe("A", rows, cost(rows))
    burst = [request(6, at=100.0) for _ in range(4)]
    for queued in burst:
        scheduler.add(queued, queued.arrival)
    first = scheduler.plan(100.0)
    assert len(first.admitted) == 4
    rows = len(first.stepped or burst)
    scheduler.update(first, StepOutcome(rows, cost(rows), first.stepped), 100.0 + cost(rows))
    now = 100.0 + cost(rows)
    for _ in range(3):
        plan = scheduler.plan(now)
        assert plan.stepped is None  # every row
        scheduler.update(plan, StepOutcome(4, cost(4), None), now + cost(4))
        now += cost(4)
