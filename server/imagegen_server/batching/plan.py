"""What crosses the scheduler's contract at a step boundary: the plan `Scheduler.plan` makes,
the outcome its caller reports to `Scheduler.update`, and what that settled. Pure data: the
batcher fills `StepOutcome` from the engine's `StepResult`, the simulations from a fake engine.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from ..base.request import Request


@dataclass(slots=True)
class StepPlan:
    """What the engine does at one step boundary."""

    # The batch that runs one step; None = nothing to run (see `wake_at`).
    group: Hashable | None = None
    # Waiting requests that join `group` before the step, in rank order; now RUNNING.
    admitted: list[Request] = field(default_factory=list)
    # Tickets of the requests that run the step; None = every request of `group`.
    stepped: list[str] | None = None
    # When nothing runs: when the plan can change by itself (a batch fills, a deadline passes).
    wake_at: float | None = None
    # Requests past their deadlines, now FAILED: the caller answers DEADLINE_EXCEEDED. Queued
    # ones never reached the engine; running ones are also in `dropped`.
    expired: list[Request] = field(default_factory=list)
    # Tickets whose rows the engine drops before the step: cancelled or expired while running.
    dropped: list[str] = field(default_factory=list)


@dataclass(slots=True)
class StepOutcome:
    """What happened to a plan's step: the scheduler's only news from the engine."""

    # Rows in the step's transformer call; 0 = no step ran (every admitted request failed or
    # left before it, and nothing else ran in the batch).
    rows: int = 0
    # Seconds the denoising step took: the cost model row selection learns from.
    seconds: float = 0.0
    # Tickets whose rows ran the step; None = every request of the batch. The plan's `stepped`
    # less those that left before the step (None when none of them is left).
    stepped: list[str] | None = None
    # Tickets whose last step this was.
    finished: list[str] = field(default_factory=list)
    # Tickets lost to a model error in the step.
    failed: list[str] = field(default_factory=list)
    # Tickets whose prompts could not be encoded when they were admitted: they never stepped.
    failed_to_start: list[str] = field(default_factory=list)
    # After out-of-memory: the most rows that fit in one call (the step still completed).
    out_of_memory_rows: int | None = None
    # The step raised past the engine's per-row isolation: every request of the batch failed.
    batch_failed: bool = False

    @property
    def timed_cleanly(self) -> bool:
        """Whether `seconds` is what a step of `rows` rows costs: it ran, whole and in one go."""
        return self.rows > 0 and self.out_of_memory_rows is None and not self.failed


@dataclass(slots=True)
class Settled:
    """The requests `Scheduler.update` ended; they have left the scheduler."""

    # Ran their last step (FINISHED): their waiters get the images.
    finished: list[Request] = field(default_factory=list)
    # Lost to an error (FAILED): their waiters get INTERNAL.
    failed: list[Request] = field(default_factory=list)
