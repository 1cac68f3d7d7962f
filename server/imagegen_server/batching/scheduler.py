"""Queue policy and batch formation: pure Python, no torch, no asyncio, no wall clock.

The scheduler holds `Request`s and decides, at every denoising-step boundary, which batch runs
the next step and which waiting requests join it. Time is always an argument (`now`), so tests
drive it with a fake clock. Its whole contract is four calls: `add` and `cancel` as requests
arrive and leave, `plan(now)` before each step and `update(plan, outcome, now)` after it.

Two policies share this code (docs/architecture.md, "Batching and row selection"):
- "step" (continuous batching): a running batch admits waiting rows of its key at every step
  boundary; requests with different step counts share a batch; up to `max_active_batches`
  batches of different keys are in flight and take turns step by step. With
  `row_selection="cost"`, a batch nobody waits for steps only the requests that cost-aware row
  selection picks (row_selection.py; docs/architecture.md, "Cost-aware row selection"); the
  others wait at the boundary.
- "request" (Triton's dynamic batcher): a batch is formed from requests of one key *and step
  count*, runs all its steps, and nothing joins it; one batch at a time.

Both order waiting requests by (priority, fair-share tag): priority 1 is highest; within a
level, tenants share the engine by weight and cost (fair_share.py), FIFO for a lone tenant.
Unlike Triton, forming a batch looks past the queue head for requests of a matching key, and no
key starves: every choice is bounded by the best-ranked waiting request (see `plan`).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Literal

from ..base.errors import QueueFull
from ..base.request import Request, RequestStatus
from .estimates import QueueEstimate, estimate_starts
from .fair_share import FairShare
from .plan import Settled, StepOutcome, StepPlan
from .queues import RunningBatches, WaitingQueue
from .row_limits import RowLimits
from .row_selection import BusyShare, RecentRate, StepCosts, pick_rows

log = logging.getLogger(__name__)

Policy = Literal["step", "request"]
RowSelection = Literal["all", "cost"]
Rank = tuple[int, float, int]


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    policy: Policy = "step"
    max_batch_size: int = 8  # most rows in one step
    max_queue_delay_s: float = 0.0  # longest a new batch waits to fill
    preferred_batch_sizes: tuple[int, ...] = ()  # sizes a new batch tries to reach
    max_queue_size: int = 0  # most waiting requests; 0 = unbounded
    max_active_batches: int = 1  # step policy: batches of different keys in flight
    default_queue_timeout_s: float = 0.0  # longest wait in the queue; 0 = none
    row_limit_recovery_s: float = 60.0  # after out-of-memory: when to try twice the rows again
    row_selection: RowSelection = "all"  # step policy: "cost" lets rows sit out a step

    @property
    def joins_running(self) -> bool:
        return self.policy == "step"

    @property
    def active_batch_limit(self) -> int:
        return self.max_active_batches if self.policy == "step" else 1


class Scheduler:
    """Decides batches. Its caller (the batcher, or a simulation) holds one lock around every
    call, from the event loop and the engine thread alike.

    When each call happens: `add` when a request is accepted, `cancel` when its caller gives
    up; at every step boundary `plan(now)`, then the caller runs the plan on the engine, then
    `update(plan, outcome, now)` with what happened, exactly once per plan that chose a batch.
    """

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self._waiting = WaitingQueue()
        self._running = RunningBatches()
        self._cancelled_running: list[str] = []  # tickets to drop at the next boundary
        self._seq = itertools.count()
        self.row_limits = RowLimits(config.max_batch_size, config.row_limit_recovery_s)
        self.costs = StepCosts()  # measured step times, for row selection
        self._arrivals = RecentRate()  # requests accepted per second
        self._busy = BusyShare()  # the engine's recent busy share
        self._step_began: float | None = None  # when the step last planned began
        self.fair_share = FairShare()  # tags waiting requests: shares by tenant weight and cost

    # --- the contract ---

    def add(self, request: Request, now: float) -> Request | None:
        """Queues `request` when it is accepted. When the queue is full, sheds the worst-ranked
        waiting request if `request` has a strictly higher priority, and returns it, FAILED
        (its waiter gets UNAVAILABLE).

        Raises:
            QueueFull: the queue is full of requests of the same or higher priority.
        """
        request.seq = next(self._seq)
        self.fair_share.tag(request, self._waiting.idle_at(request.priority))
        self._arrivals.add(now)
        if self.config.default_queue_timeout_s > 0:
            timeout_at = now + self.config.default_queue_timeout_s
            request.queue_deadline = min(timeout_at, request.queue_deadline or timeout_at)
        if request.deadline is not None:
            request.queue_deadline = min(
                request.deadline, request.queue_deadline or request.deadline
            )
        shed = None
        limit = self.config.max_queue_size
        if limit and len(self._waiting) >= limit:
            if request.priority >= self._waiting.worst.priority:
                raise QueueFull(
                    f"queue full ({limit} requests waiting); retry later or on another replica"
                )
            shed = self._waiting.pop_worst()
            shed.settle(RequestStatus.FAILED)
        self._waiting.insert(request)
        return shed

    def cancel(self, ticket: str) -> Literal["queued", "running"] | None:
        """Called when a request's caller gives up; reports where the request was.

        A waiting request is removed at once: it never reaches the engine. A running one stays
        in its batch until the next `plan`, which drops it (`StepPlan.dropped`).
        """
        waiting = self._waiting.take(ticket)
        if waiting is not None:
            waiting.settle(RequestStatus.CANCELLED)
            return "queued"
        running = self._running.get(ticket)
        if running is None:
            return None
        running.settle(RequestStatus.CANCELLED)
        self._cancelled_running.append(ticket)
        return "running"

    def plan(self, now: float, may_step: bool = True) -> StepPlan:
        """Called at every step boundary, before the engine runs anything: plans the boundary.

        First the leavers: running requests cancelled since the last plan, and requests past
        their deadlines (`StepPlan.expired`, `StepPlan.dropped`). Then, if `may_step`, the step:
        the chosen batch is the candidate whose best-ranked member, running or waiting, ranks
        first, so batches take turns oldest-first and a key with a steady stream cannot hold
        the engine while an older request of another key waits. When a ready batch cannot
        start because `max_active_batches` are in flight, running batches admit only requests
        ranked before it, so they drain and it starts.

        Args:
            now: the caller's clock.
            may_step: False while the caller holds the engine at a boundary: the plan settles
                leavers only, and `wake_at` is the next queue deadline.
        """
        plan = StepPlan(dropped=self._take_cancelled_running())
        expired_running = self._expire_running(now)
        plan.expired = self._expire_waiting(now) + expired_running
        plan.dropped += [request.ticket for request in expired_running]
        if may_step:
            self._plan_step(plan, now)
        else:
            plan.wake_at = self.next_deadline()
        return plan

    def update(self, plan: StepPlan, outcome: StepOutcome, now: float) -> Settled:
        """Called once after the engine ran `plan`'s step (or failed to): all the bookkeeping.

        Ends the requests that failed or finished, counts steps done and sat out, backs a key
        off after out-of-memory and lets old back-offs recover, and learns the step's cost
        from a clean timing.

        Returns:
            The requests that ended here (cancelled ones excepted: their callers have gone).
        """
        settled = Settled()
        if plan.group is None:
            return settled
        if outcome.batch_failed:
            settled.failed = self._end(self.running_in(plan.group), RequestStatus.FAILED)
            return settled
        lost = self._running.of([*outcome.failed_to_start, *outcome.failed])
        settled.failed = self._end(lost, RequestStatus.FAILED)
        if outcome.rows == 0:
            return settled
        self.row_limits.after_step(self.key_of(plan.group), outcome.out_of_memory_rows, now)
        self._count_step(plan.group, outcome, now)
        if outcome.timed_cleanly:
            self.costs.observe(self.key_of(plan.group), outcome.rows, outcome.seconds)
        finished = self._running.of(outcome.finished)
        settled.finished = self._end(finished, RequestStatus.FINISHED)
        return settled

    # --- queries: metrics, queue estimates, drain, fake engines ---

    def next_deadline(self) -> float | None:
        """The earliest queue deadline, to wake up for even when nothing runs."""
        return self._waiting.next_deadline()

    def estimates(self, step_s: float) -> dict[str, QueueEstimate]:
        """Queue position and estimated start of every waiting request, by ticket (see
        estimates.estimate_starts)."""
        return estimate_starts(
            self._running, list(self._waiting), self.config.max_batch_size, step_s
        )

    @property
    def waiting_count(self) -> int:
        return len(self._waiting)

    @property
    def running_count(self) -> int:
        return len(self._running)

    @property
    def running_rows(self) -> int:
        return self._running.rows

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def running_in(self, group: Hashable) -> list[Request]:
        """The requests running in batch `group`."""
        return self._running.in_group(group)

    def stepping(self, plan: StepPlan) -> list[Request]:
        """The requests that run `plan`'s step (what a fake engine steps)."""
        if plan.group is None:
            return []
        members = self.running_in(plan.group)
        return [r for r in members if plan.stepped is None or r.ticket in plan.stepped]

    def group_of(self, request: Request) -> Hashable:
        """Request-level batches also need equal step counts: they run all their steps together."""
        return request.key if self.config.joins_running else (request.key, request.steps)

    def key_of(self, group: Hashable) -> Hashable:
        """The queue key of the requests in batch `group` (see group_of)."""
        return group if self.config.joins_running else group[0]  # type: ignore[index]

    # --- planning ---

    def _plan_step(self, plan: StepPlan, now: float) -> None:
        """Chooses the batch that steps, admits waiting requests into it and picks its rows."""
        if self._step_began is not None:  # the engine worked from that plan until now
            self._busy.add(self._step_began, now)
            self._step_began = None
        running = self._running.by_group()
        waiting = self._waiting.by_group(self.group_of)
        candidates, blocked, wake_times = self._candidates(running, waiting, now)
        if not candidates:
            plan.wake_at = min(wake_times, default=None)
            return
        group = min(candidates, key=candidates.__getitem__)
        plan.group = group
        if group not in running:
            rows = self._new_batch_rows(group, waiting[group])
            plan.admitted = self._admit(group, waiting[group], 0, rows, blocked)
        elif self.config.joins_running:
            running_rows = sum(request.rows for request in running[group])
            plan.admitted = self._admit(
                group, waiting.get(group, []), running_rows, self._row_limit(group), blocked
            )
        plan.stepped = self._select_rows(group, now)
        self._step_began = now

    def _candidates(
        self,
        running: dict[Hashable, list[Request]],
        waiting: dict[Hashable, list[Request]],
        now: float,
    ) -> tuple[dict[Hashable, Rank], Rank | None, list[float]]:
        """The batches that may step now, each with the rank of its best member; the rank of
        the best request whose batch is ready but cannot start (too many batches in flight);
        and when waiting batches become ready or a queue deadline passes."""
        candidates: dict[Hashable, Rank] = {}
        for group, members in running.items():
            joinable = waiting.get(group, []) if self.config.joins_running else []
            candidates[group] = min(request.rank for request in [*members, *joinable])
        blocked: Rank | None = None
        wake_times = [deadline] if (deadline := self.next_deadline()) is not None else []
        for group, requests in waiting.items():
            if group in running:
                continue
            ready_at = self._ready_at(group, requests)
            if ready_at > now:
                wake_times.append(ready_at)
            elif len(running) < self.config.active_batch_limit:
                candidates[group] = requests[0].rank
            elif blocked is None or requests[0].rank < blocked:
                blocked = requests[0].rank
        return candidates, blocked, wake_times

    def _row_limit(self, group: Hashable) -> int:
        """What fits on the device, or the out-of-memory back-off below it."""
        return self.row_limits.current(self.key_of(group))

    def _ready_at(self, group: Hashable, requests: list[Request]) -> float:
        """When a new batch of `group` may start: at once if it is full (or reaches the largest
        preferred size), else when its oldest request has waited max_queue_delay."""
        rows = sum(request.rows for request in requests)
        full = self._row_limit(group)
        preferred = [size for size in self.config.preferred_batch_sizes if size <= full]
        if rows >= full or (preferred and rows >= max(preferred)):
            return float("-inf")
        return min(request.arrival for request in requests) + self.config.max_queue_delay_s

    def _new_batch_rows(self, group: Hashable, requests: list[Request]) -> int:
        """Rows for a new batch: the largest preferred size the queue can fill, else the limit."""
        limit = self._row_limit(group)
        rows = sum(request.rows for request in requests)
        fitting = [size for size in self.config.preferred_batch_sizes if size <= min(rows, limit)]
        return max(fitting) if fitting else limit

    def _admit(
        self,
        group: Hashable,
        candidates: Iterable[Request],
        used_rows: int,
        row_limit: int,
        blocked: Rank | None,
    ) -> list[Request]:
        """Moves waiting requests into `group` in rank order while they fit.

        Stops at the first request that does not fit rather than skipping it, so a large request
        cannot be starved by a stream of small ones, and (when another batch is blocked) at the
        first request ranked after the blocked one, so this batch drains.
        """
        admitted = []
        for request in candidates:
            if blocked is not None and request.rank > blocked:
                break
            if used_rows + request.rows > row_limit and used_rows > 0:
                break
            admitted.append(request)
            used_rows += request.rows
        for request in admitted:
            self.fair_share.admitted(request)
            self._waiting.remove(request)
            self._running.start(request, group)
        return admitted

    def _select_rows(self, group: Hashable, now: float) -> list[str] | None:
        """The tickets of `group` that run its next step; None = all of them.

        Only a batch that nobody waits for may hold rows back: while requests wait, full steps
        are what empties the queue. row_selection.pick_rows decides who steps.
        """
        if self.config.row_selection != "cost" or not self.config.joins_running or self._waiting:
            return None
        members = self.running_in(group)
        cost = self.costs.line(self.key_of(group))
        if len(members) < 2 or cost is None:
            return None
        arrivals_per_s, busy_share = self._arrivals.per_second(now), self._busy.share(now)
        stepping = pick_rows(members, cost, now, arrivals_per_s, busy_share)
        if len(stepping) == len(members):
            return None
        log.debug(
            "%d of %d requests step: %.3f s + %.3f s per row, %.2f arrivals/s, busy %.2f",
            len(stepping),
            len(members),
            cost.fixed_s,
            cost.per_row_s,
            arrivals_per_s,
            busy_share,
        )
        return [request.ticket for request in stepping]

    # --- leaving ---

    def _take_cancelled_running(self) -> list[str]:
        """Running requests cancelled since the last plan leave their batch now."""
        cancelled, self._cancelled_running = self._cancelled_running, []
        for ticket in cancelled:
            self._running.leave(ticket)
        return cancelled

    def _expire_waiting(self, now: float) -> list[Request]:
        expired = self._waiting.expire(now)
        for request in expired:
            request.settle(RequestStatus.FAILED)
        return expired

    def _expire_running(self, now: float) -> list[Request]:
        return self._end(self._running.past_deadline(now), RequestStatus.FAILED)

    def _end(self, requests: list[Request], status: RequestStatus) -> list[Request]:
        """Running `requests` leave their batch with `status`; returns those it ended (not the
        ones already ended, such as cancelled ones whose last step ran)."""
        ended = []
        for request in requests:
            self._running.leave(request.ticket)
            if not request.status.ended:
                request.settle(status)
                ended.append(request)
        return ended

    # --- after a step ---

    def _count_step(self, group: Hashable, outcome: StepOutcome, now: float) -> None:
        """Each request of the batch either ran the step or sat it out."""
        for request in self.running_in(group):
            if outcome.stepped is None or request.ticket in outcome.stepped:
                request.count_step(outcome.rows, now - outcome.seconds, now)
            else:
                request.count_deferred()
