"""One request, from acceptance to its end: the object the scheduler, the batcher and the engine
read (the engine through `engine_request`, a view of it).

Identity, parameters, batching facts, status and progress live here once. What a request is
*waiting on* (the asyncio queue its events go to) does not: that is the batcher's
`RequestHandle`, because this module stays pure (no asyncio, no torch) so the scheduler's tests
and the bench's simulations build requests with no event loop and no model.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable
from dataclasses import dataclass

from .cost import request_cost
from .engine_api import EngineRequest
from .types import GenerationParams


class RequestStatus(enum.Enum):
    QUEUED = "queued"  # waiting in the scheduler's queue; never reached the engine
    RUNNING = "running"  # admitted into a batch: its rows step on the engine
    FINISHED = "finished"  # ran its last step; its images went to its waiter
    FAILED = "failed"  # ended with an error: a deadline, shed, a model error, the engine stopped
    CANCELLED = "cancelled"  # its caller gave up (cancelled, disconnected, past its deadline)

    @property
    def ended(self) -> bool:
        return self not in (RequestStatus.QUEUED, RequestStatus.RUNNING)


@dataclass(slots=True, eq=False)
class Request:
    """A request in the server: identity, parameters, batching facts, status and progress.

    Two ids, named apart: `request_id` is the client's (it may repeat across clients and
    retries); `ticket` is the server's, unique inside the process, and the id the scheduler and
    the engine know the request by.
    """

    ticket: str  # the server's id for it; the engine's `EngineRequest.request_id`
    params: GenerationParams  # what to generate, validated; holds the client's request_id
    key: Hashable  # rows of equal keys may share a transformer call (a BatchKey when serving)
    arrival: float  # clock time it was accepted
    deadline: float | None = None  # must have finished by then (the client's deadline)
    queue_deadline: float | None = None  # must have started by then; set by the scheduler
    seq: int = 0  # arrival order, set by the scheduler; breaks ties between equal ranks
    status: RequestStatus = RequestStatus.QUEUED
    steps_done: int = 0  # denoising steps its rows ran: the one progress counter
    deferred_steps: int = 0  # steps of its batch it sat out (cost-aware row selection)
    started_at: float | None = None  # clock time it left the queue (set by the batcher)
    rows_seen: int = 0  # sum of the rows of the transformer calls it stepped in
    max_batch: int = 0  # most rows in one transformer call it stepped in
    tenant: str = ""  # who it is billed to (the token's tenant); fair share groups by it
    weight: float = 1.0  # its tenant's share weight (the token policy's `weight`)
    fair_tag: float = 0.0  # virtual start time, set by the scheduler's fair share on `add`
    # (began, ended, batch rows) of each step it ran, kept only while tracing (None = off)
    step_log: list[tuple[float, float, int]] | None = None

    @property
    def request_id(self) -> str:
        """The client's id (not unique: see `ticket`)."""
        return self.params.request_id

    @property
    def rows(self) -> int:
        """Images it makes; all of them step together."""
        return self.params.num_images

    @property
    def steps(self) -> int:
        """Denoising steps it runs (after strength, for image-to-image)."""
        return self.params.steps

    @property
    def priority(self) -> int:
        """1 = highest."""
        return self.params.priority

    @property
    def cost(self) -> float:
        """Its denoising work in megapixel-steps (base/cost.py)."""
        return request_cost(self.params)

    @property
    def rank(self) -> tuple[int, float, int]:
        """Queue order: priority, then the fair-share tag (arrival order for one tenant: see
        batching/fair_share.py), then arrival order."""
        return (self.priority, self.fair_tag, self.seq)

    @property
    def remaining_steps(self) -> int:
        return self.steps - self.steps_done

    @property
    def mean_batch(self) -> float:
        """Mean rows of the transformer calls it stepped in."""
        return self.rows_seen / max(1, self.steps_done)

    def count_step(
        self, batch_rows: int, began: float | None = None, ended: float | None = None
    ) -> None:
        """Its rows ran one denoising step in a transformer call of `batch_rows` rows, from
        `began` to `ended` (clock times; logged for tracing only)."""
        if self.step_log is not None and began is not None and ended is not None:
            self.step_log.append((began, ended, batch_rows))
        self.steps_done += 1
        self.rows_seen += batch_rows
        self.max_batch = max(self.max_batch, batch_rows)

    def count_deferred(self) -> None:
        """Its batch stepped without it (cost-aware row selection held it back)."""
        self.deferred_steps += 1

    def settle(self, status: RequestStatus) -> None:
        """Ends it with `status`. The first end sticks: a request cancelled while its last step
        ran stays cancelled."""
        if not self.status.ended:
            self.status = status

    def engine_request(self) -> EngineRequest:
        """The view the engine gets: the ticket as its id, and the parameters."""
        return EngineRequest(self.ticket, self.params)
