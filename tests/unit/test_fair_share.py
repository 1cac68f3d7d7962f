"""Fair share inside the scheduler: tenants of one priority level share the engine by weight and
cost. A fake clock (one tick per step) and a fake engine, through add / plan / update only."""

from __future__ import annotations

import itertools
from collections import Counter

from imagegen_server.base.request import Request
from imagegen_server.batching.plan import StepOutcome
from imagegen_server.batching.scheduler import Scheduler, SchedulerConfig
from support import scheduled_request

_ids = itertools.count()
STEPS = 4


def tenant_request(
    tenant: str, weight: float = 1.0, at: float = 0.0, steps: int = STEPS, priority: int = 1
) -> Request:
    request = scheduled_request(f"{tenant}-{next(_ids)}", steps=steps, priority=priority, at=at)
    request.tenant, request.weight = tenant, weight
    return request


class Engine:
    """One row per step (max_batch_size 1), so the order of work is the order of admission."""

    def __init__(self) -> None:
        self.scheduler = Scheduler(SchedulerConfig(policy="step", max_batch_size=1))
        self.now = 0.0
        self.work: list[tuple[str, float]] = []  # (tenant, cost of one step) per step run
        self.started: dict[str, float] = {}

    def add(self, request: Request) -> None:
        self.scheduler.add(request, self.now)

    def run(self, ticks: int) -> None:
        for _ in range(ticks):
            plan = self.scheduler.plan(self.now)
            for request in plan.admitted:
                self.started[request.ticket] = self.now
            stepping = self.scheduler.stepping(plan)
            for request in stepping:
                self.work.append((request.tenant, request.cost / request.steps))
            finished = [r.ticket for r in stepping if r.remaining_steps == 1]
            outcome = StepOutcome(rows=len(stepping), seconds=1.0, finished=finished)
            if plan.group is not None:
                self.scheduler.update(plan, outcome, self.now + 1.0)
            self.now += 1.0

    def share(self) -> Counter[str]:
        """Cost served per tenant."""
        served: Counter[str] = Counter()
        for tenant, cost in self.work:
            served[tenant] += cost
        return served


def test_two_flooding_tenants_share_the_work_by_weight() -> None:
    engine = Engine()
    for _ in range(40):
        engine.add(tenant_request("light", weight=1.0))
        engine.add(tenant_request("heavy", weight=3.0))
    engine.run(ticks=32 * STEPS)  # 32 requests' work: 8 and 24 at exactly 1:3
    share = engine.share()
    ratio = share["heavy"] / share["light"]
    # Tolerance: one request of either tenant (the tags interleave request by request).
    assert 23 / 9 <= ratio <= 25 / 7, share


def test_shares_follow_cost_not_request_count() -> None:
    engine = Engine()
    for _ in range(40):
        engine.add(tenant_request("large", steps=8))  # costs twice as much per request
        engine.add(tenant_request("small", steps=2))
    engine.run(ticks=120)
    share = engine.share()
    assert abs(share["large"] - share["small"]) <= tenant_request("x", steps=8).cost, share
    finished = Counter(t.split("-")[0] for t, at in engine.started.items() if at < 100)
    assert finished["small"] >= 3 * finished["large"]


def test_a_lone_tenant_gets_the_whole_machine_first_come_first_served() -> None:
    engine = Engine()
    requests = [tenant_request("only", weight=0.1) for _ in range(6)]
    for request in requests:
        engine.add(request)
    engine.run(ticks=6 * STEPS)
    assert engine.scheduler.running_count == 0 and engine.scheduler.waiting_count == 0
    assert sorted(engine.started, key=engine.started.__getitem__) == [r.ticket for r in requests]
    assert len(engine.work) == 6 * STEPS  # a step every tick: the low weight idles nothing


def test_a_late_tenant_waits_at_most_one_request_per_busy_tenant() -> None:
    engine = Engine()
    for _ in range(50):
        engine.add(tenant_request("a"))
        engine.add(tenant_request("b", weight=3.0))
    engine.run(ticks=41)  # mid-request, deep into both backlogs
    late = tenant_request("late", at=engine.now)
    engine.add(late)
    arrived = engine.now
    engine.run(ticks=4 * STEPS)
    # The request running now, then at most one of each waiting tenant, then the newcomer.
    assert engine.started[late.ticket] - arrived <= 3 * STEPS


def test_priority_comes_before_share() -> None:
    engine = Engine()
    for _ in range(10):
        engine.add(tenant_request("heavy", weight=100.0, priority=2))
    urgent = tenant_request("light", weight=0.01, priority=1)
    engine.add(urgent)
    engine.run(ticks=1)
    assert engine.started == {urgent.ticket: 0.0}


def test_an_idle_tenant_banks_no_credit() -> None:
    engine = Engine()
    for _ in range(20):
        engine.add(tenant_request("steady"))
    engine.run(ticks=10 * STEPS)  # "returning" was idle all this while
    for _ in range(10):
        engine.add(tenant_request("returning"))
    engine.run(ticks=8 * STEPS)
    recent = [tenant for tenant, _ in engine.work[-8 * STEPS :]]
    assert abs(recent.count("returning") - recent.count("steady")) <= 2 * STEPS


def test_fair_share_state_stays_bounded_by_waiting_tenants() -> None:
    engine = Engine()
    for number in range(200):
        engine.add(tenant_request(f"t{number}"))
        engine.run(ticks=STEPS)
    assert engine.scheduler.fair_share.tenants() <= 2
