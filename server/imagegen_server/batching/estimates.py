"""Queue positions and start-time estimates for streaming callers (their `Queued` events)."""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..base.request import Request


@dataclass(frozen=True, slots=True)
class QueueEstimate:
    position: int  # 0 = next to start
    start_in_s: float  # estimated seconds until its first step


def estimate_starts(
    running: Iterable[Request], waiting: Sequence[Request], slots: int, step_s: float
) -> dict[str, QueueEstimate]:
    """Queue position and estimated start of every `waiting` request (in rank order), by ticket.

    Models the engine as `slots` row slots (max_batch_size) stepping together every `step_s`: a
    running row frees its slot when its steps are done, and waiting requests take slots in rank
    order. Key switches are ignored, so this is an estimate, not a promise.
    """
    free_after = [request.remaining_steps for request in running for _ in range(request.rows)]
    free_after += [0] * max(0, slots - len(free_after))
    heapq.heapify(free_after)
    result = {}
    for position, request in enumerate(waiting):
        taken = [heapq.heappop(free_after) for _ in range(min(request.rows, len(free_after)))]
        start = max(taken, default=0)
        for _ in taken:
            heapq.heappush(free_after, start + request.steps)
        result[request.ticket] = QueueEstimate(position, start * step_s)
    return result
