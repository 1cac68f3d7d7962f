"""The queue policy on its own: a fake clock, no torch, no sockets."""

from __future__ import annotations

import itertools
from collections.abc import Hashable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from imagegen_server.base.errors import QueueFull
from imagegen_server.base.request import Request, RequestStatus
from imagegen_server.batching.plan import StepOutcome, StepPlan
from imagegen_server.batching.scheduler import Scheduler, SchedulerConfig
from support import scheduled_request

_ids = itertools.count()


def entry(
    key: Hashable = "A",
    at: float = 0.0,
    steps: int = 4,
    rows: int = 1,
    priority: int = 1,
    deadline: float | None = None,
    name: str | None = None,
) -> Request:
    return scheduled_request(
        name or f"r{next(_ids)}",
        key=key,
        at=at,
        steps=steps,
        rows=rows,
        priority=priority,
        deadline=deadline,
    )


def step_policy(**overrides: object) -> Scheduler:
    config = {"policy": "step", "max_batch_size": 4, "max_active_batches": 2, **overrides}
    return Scheduler(SchedulerConfig(**config))  # type: ignore[arg-type]


def request_policy(**overrides: object) -> Scheduler:
    config = {"policy": "request", "max_batch_size": 4, **overrides}
    return Scheduler(SchedulerConfig(**config))  # type: ignore[arg-type]


def ids(requests: list[Request]) -> list[str]:
    return [r.ticket for r in requests]


def fake_step(scheduler: Scheduler, plan: StepPlan, **reported: object) -> StepOutcome:
    """What an engine reports for `plan`'s step, one second per step; `reported` overrides."""
    stepping = scheduler.stepping(plan)
    rows = sum(r.rows for r in stepping)
    finished = [r.ticket for r in stepping if r.remaining_steps == 1]
    fields = {"rows": rows, "seconds": 1.0, "stepped": plan.stepped, "finished": finished}
    return StepOutcome(**{**fields, **reported})  # type: ignore[arg-type]


@dataclass
class Simulation:
    """Drives a scheduler like the engine thread does, through `plan` and `update` only: one
    step per tick of the fake clock."""

    scheduler: Scheduler
    now: float = 0.0
    started: dict[str, float] = field(default_factory=dict)
    finished: dict[str, float] = field(default_factory=dict)
    steps: list[tuple[Hashable, int]] = field(default_factory=list)  # (group, rows) per step
    # The fake engine runs out of memory at these steps (0 = the first): step -> rows that fit.
    out_of_memory: dict[int, int] = field(default_factory=dict)

    def tick(self) -> None:
        plan = self.scheduler.plan(self.now)
        if plan.group is not None:
            for admitted in plan.admitted:
                self.started[admitted.ticket] = self.now
            outcome = fake_step(
                self.scheduler, plan, out_of_memory_rows=self.out_of_memory.get(len(self.steps))
            )
            self.steps.append((plan.group, outcome.rows))
            for request in self.scheduler.update(plan, outcome, self.now + 1.0).finished:
                self.finished[request.ticket] = self.now
        self.now += 1.0

    def run(self, ticks: int) -> None:
        for _ in range(ticks):
            self.tick()


# --- ordering ---


def test_priority_first_then_fifo_within_a_level() -> None:
    scheduler = request_policy(max_batch_size=1)
    for name, priority, at in (
        ("low-1", 2, 0.0),
        ("low-2", 2, 1.0),
        ("high", 1, 2.0),
        ("high-2", 1, 3.0),
    ):
        scheduler.add(entry(priority=priority, at=at, name=name), now=at)
    estimates = scheduler.estimates(step_s=1.0)
    order = sorted(estimates, key=lambda name: estimates[name].position)
    assert order == ["high", "high-2", "low-1", "low-2"]
    assert ids(scheduler.plan(now=3.0).admitted) == ["high"]


def test_looks_past_the_queue_head_for_rows_of_the_same_key() -> None:
    scheduler = request_policy(max_batch_size=3)
    for name, key in (("a1", "A"), ("b1", "B"), ("a2", "A"), ("b2", "B"), ("a3", "A")):
        scheduler.add(entry(key=key, name=name), now=0.0)
    plan = scheduler.plan(now=0.0)
    assert ids(plan.admitted) == ["a1", "a2", "a3"]


# --- request-level (Triton) policy ---


def test_request_level_waits_max_queue_delay_to_fill_a_batch() -> None:
    scheduler = request_policy(max_queue_delay_s=0.5)
    scheduler.add(entry(name="first"), now=0.0)
    plan = scheduler.plan(now=0.1)
    assert plan.group is None and plan.wake_at == pytest.approx(0.5)
    scheduler.add(entry(name="second", at=0.2), now=0.2)
    plan = scheduler.plan(now=0.5)
    assert ids(plan.admitted) == ["first", "second"]


def test_a_full_batch_starts_without_waiting_for_the_delay() -> None:
    scheduler = request_policy(max_queue_delay_s=10.0, max_batch_size=2)
    scheduler.add(entry(), now=0.0)
    scheduler.add(entry(), now=0.0)
    assert len(scheduler.plan(now=0.0).admitted) == 2


def test_request_level_batches_need_equal_step_counts_and_nothing_joins() -> None:
    scheduler = request_policy()
    scheduler.add(entry(steps=4, name="four"), now=0.0)
    scheduler.add(entry(steps=8, name="eight"), now=0.0)
    plan = scheduler.plan(now=0.0)
    assert ids(plan.admitted) == ["four"]
    scheduler.add(entry(steps=4, name="late-four", at=1.0), now=1.0)
    plan = scheduler.plan(now=1.0)
    assert plan.group == ("A", 4) and plan.admitted == []  # runs on, nobody joins


def test_preferred_batch_sizes_after_the_delay() -> None:
    scheduler = request_policy(
        max_batch_size=8, preferred_batch_sizes=(2, 4), max_queue_delay_s=1.0
    )
    for _ in range(3):
        scheduler.add(entry(), now=0.0)
    assert scheduler.plan(now=0.5).group is None  # 3 < 4 (the largest preferred): wait
    assert len(scheduler.plan(now=1.0).admitted) == 2  # the largest preferred size that fits


def test_reaching_the_largest_preferred_size_starts_at_once() -> None:
    scheduler = request_policy(
        max_batch_size=8, preferred_batch_sizes=(2, 4), max_queue_delay_s=1.0
    )
    for _ in range(5):
        scheduler.add(entry(), now=0.0)
    assert len(scheduler.plan(now=0.0).admitted) == 4


# --- step-level (continuous) policy ---


def test_step_level_rows_join_a_running_batch_whatever_their_step_count() -> None:
    simulation = Simulation(step_policy())
    simulation.scheduler.add(entry(steps=8, name="eight"), now=0.0)
    simulation.run(3)
    simulation.scheduler.add(entry(steps=4, name="four", at=3.0), now=3.0)
    simulation.run(10)
    assert simulation.started == {"eight": 0.0, "four": 3.0}
    assert simulation.finished["four"] == 6.0  # 4 steps from tick 3, not after "eight"
    assert simulation.finished["eight"] == 7.0
    assert [rows for _, rows in simulation.steps] == [1, 1, 1, 2, 2, 2, 2, 1]


def test_a_request_that_does_not_fit_is_not_overtaken() -> None:
    scheduler = step_policy(max_batch_size=4)
    scheduler.add(entry(rows=3, name="three"), now=0.0)
    assert ids(scheduler.plan(now=0.0).admitted) == ["three"]
    scheduler.add(entry(rows=2, name="two", at=1.0), now=1.0)
    scheduler.add(entry(rows=1, name="one", at=2.0), now=2.0)
    plan = scheduler.plan(now=2.0)
    assert plan.admitted == []  # "one" would fit, but "two" is older and waits for room


def test_row_limit_caps_a_key_below_max_batch_size() -> None:
    scheduler = step_policy(max_batch_size=8)
    scheduler.row_limits.cap("A", 2)
    for _ in range(4):
        scheduler.add(entry(), now=0.0)
    assert len(scheduler.plan(now=0.0).admitted) == 2
    assert scheduler.plan(now=0.0).admitted == []  # the other two wait for room


def test_out_of_memory_back_off_recovers_up_to_what_fits_on_the_device_and_no_further() -> None:
    # The first step's 2 rows run out of memory; 1 fits. A step takes 1 s of the fake clock.
    simulation = Simulation(
        step_policy(max_batch_size=8, row_limit_recovery_s=3.0), out_of_memory={0: 1}
    )
    scheduler = simulation.scheduler
    scheduler.row_limits.cap("A", 2)  # the memory probe: 2 rows fit
    scheduler.add(entry(steps=2), now=0.0)
    for _ in range(40):
        scheduler.add(entry(at=simulation.now, steps=2), now=simulation.now)
        simulation.tick()
    rows = [rows for _, rows in simulation.steps]
    # The batch that ran out of memory runs on (its rows are in: the engine splits its calls);
    # new batches take 1 row until the back-off, set as step 0 ended (t = 1), is 3 s old.
    assert rows[:5] == [2, 2, 1, 1, 2]
    assert max(rows) == 2 and rows[-10:] == [2] * 10  # recovered to the probe's 2, never 8


def test_batches_of_different_keys_take_turns_oldest_first() -> None:
    simulation = Simulation(step_policy(max_active_batches=2))
    simulation.scheduler.add(entry(key="A", steps=4, name="a"), now=0.0)
    simulation.run(1)
    simulation.scheduler.add(entry(key="B", steps=2, name="b", at=1.0), now=1.0)
    simulation.run(10)
    assert [group for group, _ in simulation.steps] == ["A", "A", "A", "A", "B", "B"]


def test_a_blocked_key_makes_the_running_batch_drain() -> None:
    simulation = Simulation(step_policy(max_active_batches=1, max_batch_size=8))
    scheduler = simulation.scheduler
    scheduler.add(entry(key="A", steps=4, name="a0"), now=0.0)
    simulation.run(1)
    scheduler.add(entry(key="B", steps=4, name="b", at=1.0), now=1.0)
    for tick in range(1, 12):  # a steady stream of A that would keep the batch alive forever
        scheduler.add(entry(key="A", steps=4, at=float(tick)), now=float(tick))
        simulation.tick()
    assert simulation.started["b"] == 4.0  # right after a0's last step, not after the A stream


# --- admission, deadlines, cancellation ---


def test_full_queue_refuses_same_priority_and_sheds_for_higher() -> None:
    scheduler = request_policy(max_queue_size=2)
    scheduler.add(entry(priority=2, name="old"), now=0.0)
    scheduler.add(entry(priority=2, name="new"), now=1.0)
    with pytest.raises(QueueFull, match="queue full"):
        scheduler.add(entry(priority=2), now=2.0)
    shed = scheduler.add(entry(priority=1, name="urgent"), now=3.0)
    assert shed is not None and shed.ticket == "new"  # the worst-ranked: lowest, newest
    assert shed.status is RequestStatus.FAILED
    assert scheduler.waiting_count == 2


def test_queued_requests_expire_at_their_deadline_or_the_default_timeout() -> None:
    scheduler = request_policy(default_queue_timeout_s=5.0, max_queue_delay_s=100.0)
    scheduler.add(entry(name="client-deadline", deadline=2.0), now=0.0)
    scheduler.add(entry(name="timeout"), now=0.0)
    assert scheduler.next_deadline() == 2.0
    first = scheduler.plan(now=2.0)
    assert ids(first.expired) == ["client-deadline"] and first.dropped == []  # never ran
    assert ids(scheduler.plan(now=5.0).expired) == ["timeout"]
    assert scheduler.waiting_count == 0


def test_running_requests_expire_at_their_deadline() -> None:
    scheduler = step_policy()
    scheduler.add(entry(name="late", deadline=3.0), now=0.0)
    scheduler.plan(now=0.0)
    plan = scheduler.plan(now=3.0)
    assert ids(plan.expired) == ["late"] and plan.dropped == ["late"]  # its rows must go
    assert plan.expired[0].status is RequestStatus.FAILED
    assert scheduler.running_count == 0


def test_cancel_reports_where_the_request_was() -> None:
    scheduler = step_policy(max_batch_size=1)
    scheduler.add(entry(name="running"), now=0.0)
    scheduler.plan(now=0.0)
    scheduler.add(entry(name="queued"), now=0.0)
    assert scheduler.cancel("queued") == "queued"
    assert scheduler.cancel("running") == "running"
    assert scheduler.cancel("unknown") is None
    assert scheduler.waiting_count == 0
    # The running one keeps its rows until the next boundary, which drops them.
    assert scheduler.running_count == 1
    assert scheduler.plan(now=1.0).dropped == ["running"]
    assert scheduler.running_count == 0


def test_estimates_follow_freeing_slots() -> None:
    scheduler = step_policy(max_batch_size=2)
    scheduler.add(entry(steps=4, name="r1"), now=0.0)
    scheduler.add(entry(steps=2, name="r2"), now=0.0)
    plan = scheduler.plan(now=0.0)
    scheduler.update(plan, fake_step(scheduler, plan), now=1.0)  # 3 and 1 steps left
    scheduler.add(entry(steps=4, name="w1"), now=1.0)
    scheduler.add(entry(steps=4, name="w2"), now=1.0)
    estimates = scheduler.estimates(step_s=0.5)
    assert (estimates["w1"].position, estimates["w1"].start_in_s) == (0, 0.5)  # after r2's 1 step
    assert (estimates["w2"].position, estimates["w2"].start_in_s) == (1, 1.5)  # after r1's 3 steps


# --- update: the bookkeeping after a step ---


def test_update_counts_the_step_and_settles_the_finished() -> None:
    scheduler = step_policy()
    short, long = entry(steps=2, name="short"), entry(steps=4, rows=2, name="long")
    for request in (short, long):
        scheduler.add(request, now=0.0)
    plan = scheduler.plan(now=0.0)
    assert [r.status for r in plan.admitted] == [RequestStatus.RUNNING] * 2
    assert scheduler.update(plan, fake_step(scheduler, plan), now=1.0).finished == []
    plan = scheduler.plan(now=1.0)
    settled = scheduler.update(plan, fake_step(scheduler, plan), now=2.0)
    assert ids(settled.finished) == ["short"] and settled.failed == []
    assert short.status is RequestStatus.FINISHED and scheduler.running_count == 1
    # One progress counter, and the batch facts the caller reports: 3 rows in both steps.
    assert (long.steps_done, long.rows_seen, long.max_batch) == (2, 6, 3)


def test_update_settles_failures_and_a_failed_batch_takes_every_request() -> None:
    scheduler = step_policy()
    requests = [entry(name=name) for name in ("encodes-badly", "breaks", "fine", "also-fine")]
    for request in requests:
        scheduler.add(request, now=0.0)
    plan = scheduler.plan(now=0.0)
    outcome = fake_step(scheduler, plan, failed=["breaks"], failed_to_start=["encodes-badly"])
    settled = scheduler.update(plan, outcome, now=1.0)
    assert ids(settled.failed) == ["encodes-badly", "breaks"]
    assert [r.status for r in requests[:2]] == [RequestStatus.FAILED] * 2
    assert requests[0].steps_done == 0 and requests[2].steps_done == 1  # only the survivors
    plan = scheduler.plan(now=1.0)
    settled = scheduler.update(plan, StepOutcome(batch_failed=True), now=2.0)
    assert ids(settled.failed) == ["fine", "also-fine"] and not scheduler.has_work()


def test_a_request_cancelled_while_its_last_step_ran_stays_cancelled() -> None:
    scheduler = step_policy()
    request = entry(steps=1, name="leaves")
    scheduler.add(request, now=0.0)
    plan = scheduler.plan(now=0.0)
    assert scheduler.cancel("leaves") == "running"  # during the step
    assert scheduler.update(plan, fake_step(scheduler, plan), now=1.0).finished == []
    assert request.status is RequestStatus.CANCELLED and scheduler.running_count == 0


def test_update_backs_off_after_out_of_memory_and_recovers_after_the_recovery_time() -> None:
    scheduler = step_policy(max_batch_size=8, row_limit_recovery_s=10.0)
    for _ in range(8):
        scheduler.add(entry(steps=100), now=0.0)
    plan = scheduler.plan(now=0.0)
    scheduler.update(plan, fake_step(scheduler, plan, out_of_memory_rows=3), now=1.0)
    assert scheduler.row_limits.current("A") == 3  # what fit
    for now in (2.0, 10.9):  # not yet 10 s old
        plan = scheduler.plan(now=now)
        scheduler.update(plan, fake_step(scheduler, plan), now=now)
        assert scheduler.row_limits.current("A") == 3
    plan = scheduler.plan(now=11.0)
    scheduler.update(plan, fake_step(scheduler, plan), now=11.0)
    assert scheduler.row_limits.current("A") == 6  # twice as many, 10 s on
    plan = scheduler.plan(now=21.0)
    scheduler.update(plan, fake_step(scheduler, plan), now=21.0)
    assert scheduler.row_limits.current("A") == 8  # what fits: the back-off is gone


def test_update_counts_deferred_steps_of_the_rows_row_selection_left_out() -> None:
    scheduler = step_policy(max_batch_size=8, row_selection="cost")
    for rows in (1, 2, 4, 8):  # a linear cost curve: every row costs the same
        scheduler.costs.observe("A", rows, 0.1 * rows)
    long, short = entry(steps=8, name="long"), entry(steps=1, name="short")
    for request in (long, short):
        scheduler.add(request, now=0.0)
    plan = scheduler.plan(now=0.0)
    assert plan.stepped == ["short"]
    settled = scheduler.update(plan, fake_step(scheduler, plan, seconds=0.1), now=0.1)
    assert ids(settled.finished) == ["short"]
    assert (long.steps_done, long.deferred_steps) == (0, 1)


@pytest.mark.parametrize("trouble", [{"out_of_memory_rows": 1}, {"failed": ["other"]}])
def test_update_learns_step_costs_from_clean_steps_only(trouble: dict[str, object]) -> None:
    scheduler = step_policy(max_batch_size=8)
    for name in ("one", "other", "third"):
        scheduler.add(entry(steps=8, name=name), now=0.0)
    plan = scheduler.plan(now=0.0)
    scheduler.update(plan, fake_step(scheduler, plan, rows=1, seconds=9.0, **trouble), now=1.0)
    for now, rows in ((1.0, 1), (2.0, 2)):
        plan = scheduler.plan(now=now)
        scheduler.update(plan, fake_step(scheduler, plan, rows=rows, seconds=rows), now=now)
    line = scheduler.costs.line("A")
    assert line is not None  # the troubled step's 9 s at 1 row is not in it
    assert (line.fixed_s, line.per_row_s) == (pytest.approx(0.0), pytest.approx(1.0))


def test_a_held_engine_gets_leavers_but_no_step() -> None:
    scheduler = step_policy(default_queue_timeout_s=5.0)
    scheduler.add(entry(name="waits"), now=0.0)
    plan = scheduler.plan(now=1.0, may_step=False)
    assert plan.group is None and plan.admitted == [] and plan.wake_at == 5.0
    assert ids(scheduler.plan(now=5.0, may_step=False).expired) == ["waits"]


# --- no key starves (property) ---

single_arrivals = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=40),  # tick
        st.sampled_from(["A", "B", "C"]),  # key
        st.sampled_from([4, 8]),  # steps
        st.integers(min_value=1, max_value=2),  # rows
    ),
    min_size=1,
    max_size=30,
)


@st.composite
def arrivals(draw: st.DrawFn) -> list[tuple[int, str, int, int]]:
    """Random arrivals plus, often, a steady stream of one key (one request per tick): the
    pattern that starves other keys under a naive continuous batcher."""
    result = draw(single_arrivals)
    if draw(st.booleans()):
        key = draw(st.sampled_from(["A", "B", "C"]))
        start = draw(st.integers(min_value=0, max_value=5))
        length = draw(st.integers(min_value=10, max_value=40))
        steps = draw(st.sampled_from([4, 8]))
        result += [(tick, key, steps, 1) for tick in range(start, start + length)]
        other = draw(st.sampled_from(sorted({"A", "B", "C"} - {key})))
        result.append((start + 1, other, draw(st.sampled_from([4, 8])), 1))  # the one at risk
    return result


@settings(max_examples=150, deadline=None)
@given(
    arrivals=arrivals(),
    active=st.integers(min_value=1, max_value=3),
    policy=st.sampled_from(["step", "request"]),
)
def test_no_request_waits_for_work_that_arrived_after_it(
    arrivals: list[tuple[int, str, int, int]], active: int, policy: str
) -> None:
    """A request's wait is bounded by the work of requests that arrived before it: a steady
    stream of another key arriving later can never hold it back."""
    config = SchedulerConfig(policy=policy, max_batch_size=4, max_active_batches=active)  # type: ignore[arg-type]
    simulation = Simulation(Scheduler(config))
    pending = sorted(arrivals)
    requests = []
    for index, (tick, key, steps, rows) in enumerate(pending):
        requests.append(entry(key=key, steps=steps, rows=rows, at=float(tick), name=f"q{index}"))
    cursor = 0
    max_steps = 8
    for _ in range(max(t for t, *_ in pending) + max_steps * len(pending) + 2):
        while cursor < len(requests) and requests[cursor].arrival <= simulation.now:
            simulation.scheduler.add(requests[cursor], now=simulation.now)
            cursor += 1
        simulation.tick()
    assert set(simulation.finished) == {r.ticket for r in requests}, "a request never finished"
    for earlier, request in enumerate(requests):  # requests are in rank (arrival) order
        wait = simulation.started[request.ticket] - request.arrival
        assert wait <= max_steps * (earlier + 1), (request, wait, earlier)
