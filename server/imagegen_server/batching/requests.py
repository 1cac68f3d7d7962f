"""The requests whose callers still wait, and the events that reach them.

A `RequestHandle` pairs a `Request` (pure, shared with the scheduler and the engine) with what
only the event loop may touch: its loop and the `asyncio.Queue` its events arrive on. The engine
thread hands events over with `loop.call_soon_threadsafe`, the one hand-off in that direction.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..base.engine_api import RequestProgress
from ..base.errors import ImageGenError
from ..base.request import Request, RequestStatus
from ..base.types import (
    CompletedEvent,
    Event,
    FailedEvent,
    GeneratedImage,
    QueuedEvent,
    StartedEvent,
    StepEvent,
)
from .estimates import QueueEstimate


@dataclass(slots=True, eq=False)
class RequestHandle:
    """A request in flight as its caller sees it: the request and the queue of its events."""

    request: Request
    loop: asyncio.AbstractEventLoop  # the event loop its caller awaits events on
    wants_progress: bool  # StreamProgress: queued/started/step events too, not only the result
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    last_position: int | None = None  # the queue position last sent: only changes are sent

    @property
    def ticket(self) -> str:
        return self.request.ticket

    @property
    def accepted_at(self) -> float:
        """Clock time the batcher accepted it."""
        return self.request.arrival

    def emit(self, event: Event) -> None:
        # A closed event loop means the server is gone and nobody listens.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class RequestTable:
    """Handles by ticket, from acceptance to their one terminal event.

    Every method runs under the batcher's lock. A request's handle leaves the table with its
    terminal event (`complete`, `fail`) or when its caller gives up (`forget`), so a ticket the
    table no longer holds needs no answer.
    """

    def __init__(self, on_empty: Callable[[], None]) -> None:
        self._handles: dict[str, RequestHandle] = {}
        self._on_empty = on_empty  # wakes drain waiters (see Batcher.wait_idle)

    def __bool__(self) -> bool:
        return bool(self._handles)

    def add(self, handle: RequestHandle) -> None:
        self._handles[handle.ticket] = handle

    def get(self, ticket: str) -> RequestHandle | None:
        return self._handles.get(ticket)

    def forget(self, ticket: str) -> RequestHandle | None:
        """Drops a request's handle; wakes drain waiters when none are left."""
        handle = self._handles.pop(ticket, None)
        if not self._handles:
            self._on_empty()
        return handle

    def fail(self, ticket: str, error: ImageGenError) -> None:
        """Ends a request with an error (FAILED, unless it had already ended)."""
        handle = self.forget(ticket)
        if handle is not None:
            handle.request.settle(RequestStatus.FAILED)
            handle.emit(FailedEvent(error))

    def fail_all(self, error: ImageGenError) -> None:
        for ticket in list(self._handles):
            self.fail(ticket, error)

    def start(self, request: Request, batch_rows: int, queued_s: float) -> None:
        """Tells a streaming caller its request left the queue into a batch of `batch_rows`."""
        handle = self._handles.get(request.ticket)
        if handle is not None and handle.wants_progress:
            handle.emit(StartedEvent(batch_size=batch_rows, queued_s=queued_s))

    def send_steps(self, progress: list[RequestProgress]) -> None:
        """Step events (with previews) for the streaming callers whose rows stepped."""
        for step in progress:
            handle = self._handles.get(step.request_id)
            if handle is not None and handle.wants_progress:
                handle.emit(StepEvent(step.step, step.total_steps, step.previews))

    def complete(self, request: Request, images: list[GeneratedImage], now: float) -> bool:
        """Sends a finished request's images; False if its caller had already gone."""
        handle = self.forget(request.ticket)
        if handle is None:  # cancelled while its last step ran
            return False
        started = request.started_at if request.started_at is not None else now
        handle.emit(
            CompletedEvent(
                images=images,
                queued_s=started - request.arrival,
                compute_s=now - started,
                max_batch_size=request.max_batch,
                mean_batch_size=request.mean_batch,
            )
        )
        return True

    def send_positions(self, estimates: Mapping[str, QueueEstimate]) -> None:
        """Queued events to streaming callers whose queue position changed."""
        for ticket, estimate in estimates.items():
            handle = self._handles.get(ticket)
            if (
                handle is None
                or not handle.wants_progress
                or handle.last_position == estimate.position
            ):
                continue
            handle.last_position = estimate.position
            handle.emit(QueuedEvent(estimate.position, estimate.start_in_s))
