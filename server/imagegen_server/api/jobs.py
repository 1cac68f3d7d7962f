"""Requests as jobs: safe retries (idempotency keys), reattachment, and cancel by id.

Protocol-neutral (no grpc here): the gRPC servicer uses it, and an HTTP layer calls the same two
methods, `start(JobOrder)` (a subscription to a new or an existing job) and `cancel`, with the
`Idempotency-Key` header as the key. Every accepted request becomes a `Job` with one
pump task that reads the batcher's events, encodes the images once, and hands every event to the
job's subscribers (the calls waiting on it).

- Without an idempotency key a job has one subscriber, its call; when that call ends early the
  job is cancelled (the rows leave at the next step boundary), as before.
- With a key the job is detached from its callers: a disconnect only unsubscribes. A repeat with
  the same key and parameters, from any connection of the same caller, subscribes to the job in
  flight (it gets the current state, then the rest) or, within the window after it finished,
  gets the stored images at once without engine work. Other parameters under the same key are
  refused (FAILED_PRECONDITION naming `idempotency_key`). A job that failed or was cancelled
  leaves the table: a repeat runs anew, which is what a retry wants.
- Memory is bounded by entries and bytes; finished results are evicted oldest-first, and a late
  repeat of an evicted key is refused with a status that says so (a tombstone remembers the key
  until its window would have ended).
- A job is accounted when it ends, not when a call does (a keyed job outlives its callers): its
  tenant's queue time and cost served, the spans of its run, and, when it never ran a step, its
  quota charge given back (refused by the batcher, shed, cancelled or timed out while queued).

Runs on the event loop only; the clock is injectable so tests move time without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field

from ..base.errors import (
    Cancelled,
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from ..base.metrics import Metrics
from ..base.request import Request, RequestStatus
from ..base.types import (
    CompletedEvent,
    FailedEvent,
    GenerationParams,
    QueuedEvent,
    StartedEvent,
    StepEvent,
)
from ..batching.batcher import Batcher
from ..batching.requests import RequestHandle
from .adapters import AdapterRegistry
from .codec import encode_image
from .idempotency import JobSettings, KeyedJobs, params_fingerprint
from .policy import OTHER_TENANT
from .quota import Charge, QuotaBook
from .tracing import Tracing

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class JobOrder:
    """What a front end asks the job table for: one call's request."""

    scope: str  # the caller's identity (auth.current_identity); keys and cancels are scoped to it
    key: str | None  # the idempotency key (checked by idempotency.check_key); None = none
    params: GenerationParams  # validated
    deadline: float | None  # time.monotonic() by which the request must have finished
    wants_progress: bool  # a stream: queued/started/step events too
    tenant: str = ""  # who a new job is billed to, for fair share ("" = no token policies)
    weight: float = 1.0  # the tenant's share weight
    traced: bool = False  # tracing is on: the batcher keeps each step's times
    charge: Charge | None = None  # what the tenant's quota was charged; given back if it never runs


@dataclass(frozen=True, slots=True)
class EncodedImage:
    data: bytes  # in the request's output format
    seed: int


@dataclass(frozen=True, slots=True)
class JobResult:
    """A finished job's images, encoded once, and its timings: what every subscriber gets."""

    images: list[EncodedImage]
    queued_s: float
    compute_s: float
    max_batch_size: int  # most rows in one step it ran in
    mean_batch_size: float

    @property
    def size_bytes(self) -> int:
        return sum(len(image.data) for image in self.images)


# What a subscriber receives: progress, then one JobResult or FailedEvent.
JobEvent = QueuedEvent | StartedEvent | StepEvent | JobResult | FailedEvent
Encoder = Callable[[GenerationParams, CompletedEvent], Awaitable[list[bytes]]]


@dataclass(slots=True, eq=False)
class Job:
    """One accepted request and the calls waiting on it."""

    scope: str  # the caller's identity: keys and cancels are scoped to it
    key: str | None  # the idempotency key; None = the job ends with its caller
    fingerprint: str  # its parameters, for refusing a repeat that differs
    params: GenerationParams  # without its init images once it ended
    handle: RequestHandle | None  # the batcher's side; dropped when it ends (init images)
    ticket: str  # the batcher's id for it
    accepted_at: float  # clock time the batcher accepted it
    tenant: str  # the metrics' label: a tenant of the tokens file, or `other`
    charge: Charge | None  # its quota charge, given back if it ends before its first step
    subscribers: list[asyncio.Queue[JobEvent]] = field(default_factory=list)
    queued: QueuedEvent | None = None  # the latest of each, for a late subscriber
    started: StartedEvent | None = None
    last_step: StepEvent | None = None
    result: JobResult | None = None  # once completed
    finished_at: float | None = None  # clock time it ended
    pump: asyncio.Task[None] | None = None
    # The batcher's Request, kept past the end for accounting (access log, tenant metrics);
    # its params lose their init images with the job's.
    request: Request | None = None

    @property
    def ended(self) -> bool:
        return self.finished_at is not None

    def catch_up(self) -> list[JobEvent]:
        """What a new subscriber is told first: where the job is now."""
        if self.result is not None:
            return [self.result]
        if self.started is None:
            return [self.queued] if self.queued is not None else []
        events: list[JobEvent] = [self.started]
        if self.last_step is not None:
            events.append(self.last_step)
        return events

    def broadcast(self, event: JobEvent) -> None:
        for queue in self.subscribers:
            queue.put_nowait(event)


class Subscription:
    """One call's view of a job: its events, and leaving it (which cancels a keyless job)."""

    def __init__(self, table: JobTable, job: Job, replayed: bool, created: bool) -> None:
        self.job = job
        self.replayed = replayed  # served from a finished result: no engine work
        self.created = created  # this call submitted the job (not a repeat under its key)
        self._table = table
        self._events: asyncio.Queue[JobEvent] = asyncio.Queue()
        for event in job.catch_up():
            self._events.put_nowait(event)
        job.subscribers.append(self._events)

    @property
    def accepted_at(self) -> float:
        """Clock time the batcher accepted the job."""
        return self.job.accepted_at

    async def events(self) -> AsyncIterator[JobEvent]:
        """The job's events up to and including its result or failure."""
        while True:
            event = await self._events.get()
            yield event
            if isinstance(event, (JobResult, FailedEvent)):
                return

    def close(self) -> None:
        self._table.unsubscribe(self.job, self._events)


class JobTable:
    """Every job in flight, and finished keyed jobs within their window."""

    def __init__(
        self,
        batcher: Batcher,
        adapters: AdapterRegistry,
        encode: Encoder,
        settings: JobSettings,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        quotas: QuotaBook | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self._batcher = batcher
        self._adapters = adapters
        self._encode = encode
        self._metrics = metrics
        self._quotas = quotas  # gives back the charges of jobs that never ran
        self._tracing = tracing or Tracing(None)  # spans of each job's run; off by default
        self._running: dict[str, Job] = {}  # by ticket: every job in flight
        self.keyed = KeyedJobs(settings, metrics, clock)  # and finished ones in their window

    @contextlib.contextmanager
    def start(self, order: JobOrder) -> Iterator[Subscription]:
        """Subscribes a call to its job: a new one, or the one its key already names.

        Yields a `Subscription`; leaving the block unsubscribes (and cancels a keyless job).

        Raises:
            FailedPrecondition: the key names a job with other parameters, or one whose result
                was evicted before its window ended.
            Whatever `Batcher.submit` raises for a new job.
        """
        # (hashing an init image costs time: only a keyed request needs its fingerprint)
        fingerprint = params_fingerprint(order.params) if order.key is not None else ""
        found = None
        if order.key is not None:
            found = self.keyed.lookup(order.scope, order.key, fingerprint)
        job = found if found is not None else self._submit(order, fingerprint)
        subscription = Subscription(self, job, replayed=job.ended, created=found is None)
        try:
            yield subscription
        finally:
            subscription.close()

    def _submit(self, order: JobOrder, fingerprint: str) -> Job:
        params = order.params
        self._adapters.hold(params.adapters)
        try:
            # A keyed job may gain a streaming subscriber later: it always asks for steps.
            progress = order.wants_progress or order.key is not None
            handle = self._batcher.submit(
                params, order.deadline, progress, order.tenant, order.weight, order.traced
            )
            if params.variant:
                self._metrics.variant_requests.labels(variant=params.variant).inc()
        except BaseException:
            self._adapters.release(params.adapters)
            self._refund(order.charge)  # refused (queue full, draining): no work was done
            raise
        job = Job(
            order.scope,
            order.key,
            fingerprint,
            params,
            handle,
            handle.ticket,
            handle.accepted_at,
            order.tenant or OTHER_TENANT,
            order.charge,
        )
        job.request = handle.request
        self._running[handle.ticket] = job
        if order.key is not None:
            self.keyed.add(job)
        job.pump = asyncio.ensure_future(self._pump(job))
        return job

    async def _pump(self, job: Job) -> None:
        """Reads the batcher's events for the job and hands them to its subscribers."""
        try:
            await self._relay(job)
        except Exception:  # its subscribers must not wait forever
            log.exception("request %s: relaying its events failed", job.ticket)
            self._finish(job, FailedEvent(InternalError("see the server log")))

    async def _relay(self, job: Job) -> None:
        while True:
            assert job.handle is not None  # (it has not ended)
            event = await job.handle.events.get()
            if isinstance(event, CompletedEvent):
                if job.request is not None:  # (its spans: queue, steps, decode until now)
                    self._tracing.record_run(job.request, time.monotonic(), decoded=True)
                encoded = await self._encode(job.params, event)
                images = [
                    EncodedImage(data, image.seed)
                    for data, image in zip(encoded, event.images, strict=True)
                ]
                result = JobResult(
                    images,
                    event.queued_s,
                    event.compute_s,
                    event.max_batch_size,
                    event.mean_batch_size,
                )
                self._finish(job, result)
                return
            if isinstance(event, FailedEvent):
                self._finish(job, event)
                return
            if isinstance(event, QueuedEvent):
                job.queued = event
            elif isinstance(event, StartedEvent):
                job.started = event
            else:
                job.last_step = event
            job.broadcast(event)

    def _finish(self, job: Job, end: JobResult | FailedEvent) -> None:
        """Ends a job once: releases its adapters, tells its subscribers, keeps a keyed result."""
        if job.ended:
            return
        job.finished_at = self.keyed.clock()
        self._running.pop(job.ticket, None)
        self._adapters.release(job.params.adapters)
        # A finished keyed job waits for the window: it keeps only what a repeat needs.
        job.handle = None
        if job.params.init_image is not None:
            job.params = dataclasses.replace(job.params, init_image=None)
            if job.request is not None:
                job.request.params = job.params
        self._account(job, finished=isinstance(end, JobResult))
        job.broadcast(end)
        if isinstance(end, JobResult):
            job.result = end
        if job.key is not None:
            self.keyed.ended(job)

    def _account(self, job: Job, finished: bool) -> None:
        """The tenant's metrics of an ended job and, if it never ran a step, its charge given
        back; the spans of a run that did not finish (a finished one's were made on arrival)."""
        request = job.request
        if request is None:
            return
        if request.started_at is not None:
            queued = request.started_at - request.arrival
            self._metrics.tenant_queue_time.labels(tenant=job.tenant).observe(queued)
        elif not finished:
            self._refund(job.charge)
        if finished:
            self._metrics.tenant_cost_served.labels(tenant=job.tenant).inc(request.cost)
        else:
            self._tracing.record_run(request, time.monotonic(), decoded=False)

    def _refund(self, charge: Charge | None) -> None:
        if charge is not None and self._quotas is not None:
            self._quotas.refund(charge)

    def names_job(self, scope: str, key: str) -> bool:
        """Whether `key` of caller `scope` names a job (in flight, or finished in its window):
        a call under it would join or replay that one."""
        return self.keyed.holds(scope, key)

    def unsubscribe(self, job: Job, events: asyncio.Queue[JobEvent]) -> None:
        """A call left its job; a keyless job in flight is cancelled with its last caller."""
        with contextlib.suppress(ValueError):
            job.subscribers.remove(events)
        if job.key is None and not job.subscribers and not job.ended:
            self._cancel(job, Cancelled("the caller went away"))

    def cancel(self, scope: str | None, *, key: str = "", request_id: str = "") -> str:
        """Cancels the caller's queued or running jobs named by `key` or by the client's
        `request_id` (all of the caller's in-flight jobs with that id); `scope` None = any
        caller's (admin). Returns where the request was: "queued" or "running".

        Raises:
            InvalidArgument: neither id given.
            NotFound: no such request in flight (names the field).
            PermissionDenied: the request is another caller's.
            FailedPrecondition: it already finished.
        """
        field_name = "idempotency_key" if key else "request_id"
        if not key and not request_id:
            raise InvalidArgument("target", "give idempotency_key or request_id")
        matches = self._named(key, request_id)
        if not matches:
            raise NotFound(f"{field_name}: no request {key or request_id!r} is in flight")
        mine = [job for job in matches if scope is None or job.scope == scope]
        if not mine:
            raise PermissionDenied(f"{field_name}: the request is another caller's")
        in_flight = [job for job in mine if not job.ended]
        if not in_flight:
            raise FailedPrecondition(f"{field_name}: the request has already finished")
        running = any(
            job.handle is not None and job.handle.request.status is RequestStatus.RUNNING
            for job in in_flight
        )
        state = "running" if running else "queued"
        for job in in_flight:
            self._cancel(job, Cancelled(f"cancelled by CancelGeneration ({field_name})"))
        self._metrics.cancellations.labels(state=state).inc()
        return state

    def _named(self, key: str, request_id: str) -> list[Job]:
        if key:
            return self.keyed.named(key)
        return [job for job in self._running.values() if job.params.request_id == request_id]

    def _cancel(self, job: Job, error: Cancelled) -> None:
        if job.handle is not None:  # a queued request leaves; a running one's rows next
            self._batcher.cancel(job.handle)
        if job.pump is not None:
            job.pump.cancel()
        self._finish(job, FailedEvent(error))


def codec_encoder(pool: Executor, metrics: Metrics, tracing: Tracing | None = None) -> Encoder:
    """Encodes a finished request's images on the codec pool, concurrently (an `encode` span
    when tracing is on)."""
    spans = tracing or Tracing(None)

    async def encode(params: GenerationParams, event: CompletedEvent) -> list[bytes]:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        with spans.span("encode", images=len(event.images)):
            encoded = await asyncio.gather(
                *(
                    loop.run_in_executor(
                        pool,
                        encode_image,
                        image.pixels,
                        params.output_format,
                        params.output_quality,
                    )
                    for image in event.images
                )
            )
        metrics.stage.labels(stage="image_encode").observe(time.perf_counter() - started)
        return list(encoded)

    return encode
