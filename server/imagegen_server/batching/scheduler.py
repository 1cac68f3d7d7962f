"""Queue policy and batch formation: pure Python, no torch, no asyncio, no wall clock.

The scheduler sees request descriptors (`QueueEntry`) and decides, at every denoising-step
boundary, which batch runs the next step and which waiting requests join it. Time is always an
argument (`now`), so tests drive it with a fake clock.

Two policies share this code (DESIGN.md, "Batching"):
- "step" (continuous batching): a running batch admits waiting rows of its key at every step
  boundary; requests with different step counts share a batch; up to `max_active_batches`
  batches of different keys are in flight and take turns step by step. With
  `row_selection="cost"`, a batch nobody waits for steps only the requests that cost-aware row
  selection picks (row_selection.py); the others wait at the boundary.
- "request" (Triton's dynamic batcher): a batch is formed from requests of one key *and step
  count*, runs all its steps, and nothing joins it; one batch at a time.

Both order waiting requests by (priority, arrival): priority 1 is highest, FIFO within a level.
Unlike Triton, forming a batch looks past the queue head for requests of a matching key, and no
key starves: every choice is bounded by the best-ranked waiting request (see `schedule`).
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from ..base.errors import QueueFull
from .row_selection import BusyShare, Candidate, CostLine, RecentRate, StepCosts, rows_to_step

log = logging.getLogger(__name__)

Policy = Literal["step", "request"]
RowSelection = Literal["all", "cost"]


@dataclass(slots=True)
class QueueEntry:
    """One request as the scheduler sees it."""

    request_id: str
    key: Hashable  # rows of equal keys may share a transformer call
    rows: int  # images the request makes; all of them run together
    steps: int  # denoising steps it runs
    priority: int  # 1 = highest
    arrival: float  # clock time it was accepted
    queue_deadline: float | None = None  # must have started by then, else DEADLINE_EXCEEDED
    deadline: float | None = None  # must have finished by then (the client's deadline)
    seq: int = 0  # arrival order, set by the scheduler; breaks ties
    steps_done: int = 0  # denoising steps run so far
    deferred_steps: int = 0  # steps of its batch it sat out (cost-aware row selection)

    @property
    def rank(self) -> tuple[int, float, int]:
        return (self.priority, self.arrival, self.seq)


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


@dataclass(slots=True)
class Expired:
    """Requests past their deadlines; they end with DEADLINE_EXCEEDED."""

    queued: list[QueueEntry] = field(default_factory=list)  # never computed
    running: list[QueueEntry] = field(default_factory=list)  # rows dropped at this boundary


@dataclass(slots=True)
class StepPlan:
    """What the engine does at one step boundary."""

    group: Hashable | None = None  # the batch that runs one step; None = nothing to run
    admitted: list[QueueEntry] = field(default_factory=list)  # join `group` before the step
    stepped: list[str] | None = None  # request ids that run the step; None = all of `group`
    wake_at: float | None = None  # when nothing runs: when the plan can change by itself


@dataclass(frozen=True, slots=True)
class QueueEstimate:
    position: int  # 0 = next to start
    start_in_s: float  # estimated seconds until its first step


class Scheduler:
    """Decides batches; the batcher calls it under one lock from the event loop and engine thread.

    Call order: `add`/`cancel` whenever requests arrive or leave; at every step boundary
    `expire(now)` and `schedule(now)`, then (after the engine ran the step) `step_done(group,
    stepped)`, `observe_step(...)` and `finish(id)` for every request that left the batch.
    """

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self._waiting: list[QueueEntry] = []  # kept sorted by rank
        self._running: dict[str, QueueEntry] = {}
        self._running_group: dict[str, Hashable] = {}
        self._seq = itertools.count()
        # Per-key limits below max_batch_size: what fits on the device (the memory probe), and
        # below that an out-of-memory back-off, which recovers over time up to the device's.
        self._fit_limits: dict[Hashable, int] = {}
        self._backoffs: dict[Hashable, tuple[int, float]] = {}  # (rows, since when)
        self.costs = StepCosts()  # measured step times, for row selection
        self._arrivals = RecentRate()  # requests accepted per second
        self._busy = BusyShare()  # the engine's recent busy share
        self._step_began: float | None = None  # when the step last planned began

    # --- requests arriving and leaving ---

    def add(self, entry: QueueEntry, now: float) -> QueueEntry | None:
        """Queues `entry`. When the queue is full, sheds the worst-ranked waiting request if
        `entry` has a strictly higher priority, and returns it (its waiter gets UNAVAILABLE).

        Raises:
            QueueFull: the queue is full of requests of the same or higher priority.
        """
        entry.seq = next(self._seq)
        self._arrivals.add(now)
        if self.config.default_queue_timeout_s > 0:
            timeout_at = now + self.config.default_queue_timeout_s
            entry.queue_deadline = min(timeout_at, entry.queue_deadline or timeout_at)
        if entry.deadline is not None:
            entry.queue_deadline = min(entry.deadline, entry.queue_deadline or entry.deadline)
        shed = None
        limit = self.config.max_queue_size
        if limit and len(self._waiting) >= limit:
            worst = self._waiting[-1]
            if entry.priority >= worst.priority:
                raise QueueFull(
                    f"queue full ({limit} requests waiting); retry later or on another replica"
                )
            shed = self._waiting.pop()
        self._insert_waiting(entry)
        return shed

    def cancel(self, request_id: str) -> Literal["queued", "running"] | None:
        """Removes a waiting request (it never reaches the engine) and reports where it was.

        A running request stays until the engine drops its rows and the batcher calls `finish`.
        """
        for index, entry in enumerate(self._waiting):
            if entry.request_id == request_id:
                del self._waiting[index]
                return "queued"
        return "running" if request_id in self._running else None

    def finish(self, request_id: str) -> None:
        """A running request left its batch: done, cancelled, expired or failed."""
        self._running.pop(request_id, None)
        self._running_group.pop(request_id, None)

    def step_done(self, group: Hashable, stepped: list[str] | None = None) -> None:
        """The engine ran one denoising step of `group` for `stepped` (None = every request)."""
        for entry in self.running_in(group):
            if stepped is None or entry.request_id in stepped:
                entry.steps_done += 1
            else:
                entry.deferred_steps += 1

    def observe_step(self, group: Hashable, rows: int, seconds: float) -> None:
        """A step of `rows` rows of `group` took `seconds` (the cost model row selection uses)."""
        self.costs.observe(self.key_of(group), rows, seconds)

    def out_of_memory(self, key: Hashable, rows_that_fit: int, now: float) -> None:
        """A step of `key` ran out of memory; `rows_that_fit` rows did not. Caps the key there
        until `recover_row_limits` finds the back-off old enough to try twice as many."""
        self._backoffs[key] = (max(1, min(rows_that_fit, self.fitting_rows(key))), now)

    def recover_row_limits(self, now: float) -> None:
        """Doubles each back-off old enough, up to what fits on the device, where it ends."""
        for key, (rows, since) in list(self._backoffs.items()):
            if now - since < self.config.row_limit_recovery_s:
                continue
            if rows * 2 >= self.fitting_rows(key):
                del self._backoffs[key]
            else:
                self._backoffs[key] = (rows * 2, now)

    def set_row_limit(self, key: Hashable, rows: int) -> None:
        """Caps the rows per step for `key` at what fits on the device, below max_batch_size.

        Called at a key's first request, before any step of it; an out-of-memory back-off
        never reads above this cap (see `out_of_memory`).
        """
        self._fit_limits[key] = max(1, min(rows, self.config.max_batch_size))

    def fitting_rows(self, key: Hashable) -> int:
        """The most rows per step of `key` the device holds (max_batch_size if not capped)."""
        return self._fit_limits.get(key, self.config.max_batch_size)

    # --- the decisions ---

    def expire(self, now: float) -> Expired:
        """Removes queued requests past their queue deadline, running ones past their deadline."""
        return Expired(queued=self._expire_waiting(now), running=self._expire_running(now))

    def next_deadline(self) -> float | None:
        """The earliest queue deadline, to wake up for even when nothing runs."""
        return min(
            (e.queue_deadline for e in self._waiting if e.queue_deadline is not None), default=None
        )

    def schedule(self, now: float) -> StepPlan:
        """Plans the next step boundary.

        The chosen batch is the candidate whose best-ranked member, running or waiting, ranks
        first: batches take turns oldest-first, so a key with a steady stream cannot hold the
        engine while an older request of another key waits. When a ready batch cannot start
        because `max_active_batches` are in flight, running batches admit only requests ranked
        before it, so they drain and it starts.
        """
        if self._step_began is not None:  # the engine worked from that plan until now
            self._busy.add(self._step_began, now)
            self._step_began = None
        plan = StepPlan()
        running = self._running_by_group()
        waiting = self._waiting_by_group()
        candidates: dict[Hashable, tuple[int, float, int]] = {}
        for group, members in running.items():
            joinable = waiting.get(group, []) if self.config.joins_running else []
            candidates[group] = min(entry.rank for entry in [*members, *joinable])
        blocked: tuple[int, float, int] | None = None
        wake_times = [deadline] if (deadline := self.next_deadline()) is not None else []
        for group, entries in waiting.items():
            if group in running:
                continue
            ready_at = self._ready_at(group, entries)
            if ready_at > now:
                wake_times.append(ready_at)
            elif len(running) < self.config.active_batch_limit:
                candidates[group] = entries[0].rank
            elif blocked is None or entries[0].rank < blocked:
                blocked = entries[0].rank
        if not candidates:
            plan.wake_at = min(wake_times, default=None)
            return plan
        group = min(candidates, key=candidates.__getitem__)
        plan.group = group
        if group not in running:
            plan.admitted = self._admit(
                group, waiting[group], 0, self._new_batch_rows(group, waiting[group]), blocked
            )
        elif self.config.joins_running:
            running_rows = sum(entry.rows for entry in running[group])
            plan.admitted = self._admit(
                group, waiting.get(group, []), running_rows, self._row_limit(group), blocked
            )
        plan.stepped = self._select_rows(group, now)
        self._step_began = now
        return plan

    def estimates(self, step_s: float) -> dict[str, QueueEstimate]:
        """Queue position and estimated start of every waiting request.

        Models the engine as `max_batch_size` row slots stepping together every `step_s`: a
        running row frees its slot when its steps are done, and waiting requests take slots in
        rank order. Key switches are ignored, so this is an estimate, not a promise.
        """
        slots = [
            entry.steps - entry.steps_done
            for entry in self._running.values()
            for _ in range(entry.rows)
        ]
        slots += [0] * max(0, self.config.max_batch_size - len(slots))
        heapq.heapify(slots)
        result = {}
        for position, entry in enumerate(self._waiting):
            taken = [heapq.heappop(slots) for _ in range(min(entry.rows, len(slots)))]
            start = max(taken, default=0)
            for _ in taken:
                heapq.heappush(slots, start + entry.steps)
            result[entry.request_id] = QueueEstimate(position, start * step_s)
        return result

    # --- state for metrics and drain ---

    @property
    def waiting_count(self) -> int:
        return len(self._waiting)

    @property
    def running_count(self) -> int:
        return len(self._running)

    @property
    def running_rows(self) -> int:
        return sum(entry.rows for entry in self._running.values())

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def running_in(self, group: Hashable) -> list[QueueEntry]:
        """The requests running in batch `group`."""
        return [
            entry
            for request_id, entry in self._running.items()
            if self._running_group[request_id] == group
        ]

    # --- helpers ---

    def _select_rows(self, group: Hashable, now: float) -> list[str] | None:
        """The requests of `group` that run its next step; None = all of them.

        Only a batch that nobody waits for may hold rows back: while requests wait, full steps
        are what empties the queue. Requests that must step (`_must_step`) go first, then by
        priority and fewest remaining steps; row_selection.rows_to_step decides how many.
        """
        if self.config.row_selection != "cost" or not self.config.joins_running or self._waiting:
            return None
        members = self.running_in(group)
        if len(members) < 2:
            return None
        cost = self.costs.line(self.key_of(group))
        if cost is None:
            return None
        rows = sum(entry.rows for entry in members)
        must = {e.request_id for e in members if self._must_step(e, cost, rows, now)}
        ordered = sorted(
            members, key=lambda e: (e.request_id not in must, e.priority, _left(e), e.rank)
        )
        arrivals_per_s, busy_share = self._arrivals.per_second(now), self._busy.share(now)
        take = rows_to_step(
            [Candidate(entry.rows, _left(entry)) for entry in ordered],
            cost,
            arrivals_per_s,
            busy_share,
        )
        take = max(take, len(must))
        if take >= len(ordered):
            return None
        log.debug(
            "%d of %d requests step: %.3f s + %.3f s per row, %.2f arrivals/s, busy %.2f",
            take,
            len(ordered),
            cost.fixed_s,
            cost.per_row_s,
            arrivals_per_s,
            busy_share,
        )
        return [entry.request_id for entry in ordered[:take]]

    @staticmethod
    def _must_step(entry: QueueEntry, cost: CostLine, rows: int, now: float) -> bool:
        """A request sits out at most as many steps as it has (its compute time at most about
        doubles), and none whose deadline leaves less than twice its remaining time at the
        current batch's step cost."""
        if entry.deferred_steps >= entry.steps:
            return True
        if entry.deadline is None:
            return False
        return entry.deadline - now < 2 * _left(entry) * cost(rows)

    def group_of(self, entry: QueueEntry) -> Hashable:
        """Request-level batches also need equal step counts: they run all their steps together."""
        return entry.key if self.config.joins_running else (entry.key, entry.steps)

    def _insert_waiting(self, entry: QueueEntry) -> None:
        index = len(self._waiting)
        while index > 0 and self._waiting[index - 1].rank > entry.rank:
            index -= 1
        self._waiting.insert(index, entry)

    def _expire_waiting(self, now: float) -> list[QueueEntry]:
        expired = [
            e for e in self._waiting if e.queue_deadline is not None and e.queue_deadline <= now
        ]
        if expired:
            gone = {id(entry) for entry in expired}
            self._waiting = [entry for entry in self._waiting if id(entry) not in gone]
        return expired

    def _expire_running(self, now: float) -> list[QueueEntry]:
        expired = [
            e for e in self._running.values() if e.deadline is not None and e.deadline <= now
        ]
        for entry in expired:
            self.finish(entry.request_id)
        return expired

    def _running_by_group(self) -> dict[Hashable, list[QueueEntry]]:
        groups: dict[Hashable, list[QueueEntry]] = {}
        for request_id, entry in self._running.items():
            groups.setdefault(self._running_group[request_id], []).append(entry)
        return groups

    def _waiting_by_group(self) -> dict[Hashable, list[QueueEntry]]:
        groups: dict[Hashable, list[QueueEntry]] = {}
        for entry in self._waiting:  # already in rank order
            groups.setdefault(self.group_of(entry), []).append(entry)
        return groups

    def key_of(self, group: Hashable) -> Hashable:
        """The queue key of the requests in batch `group` (see group_of)."""
        return group if self.config.joins_running else group[0]  # type: ignore[index]

    def _row_limit(self, group: Hashable) -> int:
        """What fits on the device, or the out-of-memory back-off below it."""
        key = self.key_of(group)
        backoff = self._backoffs.get(key)
        return self.fitting_rows(key) if backoff is None else backoff[0]

    def _ready_at(self, group: Hashable, entries: list[QueueEntry]) -> float:
        """When a new batch of `group` may start: at once if it is full (or reaches the largest
        preferred size), else when its oldest request has waited max_queue_delay."""
        rows = sum(entry.rows for entry in entries)
        full = self._row_limit(group)
        preferred = [size for size in self.config.preferred_batch_sizes if size <= full]
        if rows >= full or (preferred and rows >= max(preferred)):
            return float("-inf")
        return min(entry.arrival for entry in entries) + self.config.max_queue_delay_s

    def _new_batch_rows(self, group: Hashable, entries: list[QueueEntry]) -> int:
        """Rows for a new batch: the largest preferred size the queue can fill, else the limit."""
        limit = self._row_limit(group)
        rows = sum(entry.rows for entry in entries)
        fitting = [size for size in self.config.preferred_batch_sizes if size <= min(rows, limit)]
        return max(fitting) if fitting else limit

    def _admit(
        self,
        group: Hashable,
        candidates: Iterable[QueueEntry],
        used_rows: int,
        row_limit: int,
        blocked: tuple[int, float, int] | None,
    ) -> list[QueueEntry]:
        """Moves waiting requests into `group` in rank order while they fit.

        Stops at the first request that does not fit rather than skipping it, so a large request
        cannot be starved by a stream of small ones, and (when another batch is blocked) at the
        first request ranked after the blocked one, so this batch drains.
        """
        admitted = []
        for entry in candidates:
            if blocked is not None and entry.rank > blocked:
                break
            if used_rows + entry.rows > row_limit and used_rows > 0:
                break
            admitted.append(entry)
            used_rows += entry.rows
        for entry in admitted:
            self._waiting.remove(entry)
            self._running[entry.request_id] = entry
            self._running_group[entry.request_id] = group
        return admitted


def _left(entry: QueueEntry) -> int:
    """Denoising steps a running request still has to run."""
    return entry.steps - entry.steps_done
