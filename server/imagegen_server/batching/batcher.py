"""The bridge between the asyncio service and the engine thread.

The service calls `submit` and `cancel` on the event loop; one engine thread loads the model,
warms it up, then loops: ask the scheduler for a plan (under one lock), run it on the engine
(outside the lock), report back. Events reach each request's `asyncio.Queue` through
`loop.call_soon_threadsafe`, the one hand-off in that direction; the engine thread never touches
gRPC objects and the event loop never touches torch.

Contract: every accepted request gets exactly one terminal event (`CompletedEvent` or
`FailedEvent`), unless its caller cancelled it, in which case the caller already has its answer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..base.engine_api import AddResult, EngineLike, EngineRequest, PromptCacheStats, StepResult
from ..base.errors import (
    DeadlineExceeded,
    Draining,
    EngineUnavailable,
    ImageGenError,
    InternalError,
    InvalidArgument,
    Shed,
)
from ..base.metrics import Metrics
from ..base.types import (
    BatchKey,
    CompletedEvent,
    Event,
    FailedEvent,
    GeneratedImage,
    GenerationParams,
    QueuedEvent,
    StartedEvent,
    StepEvent,
)
from .scheduler import Expired, QueueEntry, Scheduler, StepPlan

log = logging.getLogger(__name__)

T = TypeVar("T")

# Weight of the newest step time in the running estimate used for queue ETAs.
STEP_TIME_SMOOTHING = 0.2


@dataclass(slots=True)
class Command:
    """A function to run on the engine thread at a step boundary (see `call_on_engine`)."""

    run: Callable[[EngineLike], Any]  # called with the engine, on the engine thread
    # What its caller awaits. Its caller may cancel it while it waits; only the thread that took
    # the command from the queue (under the lock) moves it to running and answers it.
    future: concurrent.futures.Future[Any]


@dataclass(slots=True, eq=False)
class RequestHandle:
    """A request in flight: its parameters and the queue its events arrive on."""

    ticket: str  # unique inside the server; request ids come from clients and may repeat
    params: GenerationParams
    loop: asyncio.AbstractEventLoop
    wants_progress: bool  # StreamProgress: queued/started/step events too, not only the result
    accepted_at: float
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    # Engine-thread bookkeeping.
    started_at: float | None = None
    steps_run: int = 0
    rows_seen: int = 0  # sum of batch sizes over its steps
    max_batch: int = 0
    last_position: int | None = None

    def emit(self, event: Event) -> None:
        # A closed event loop means the server is gone and nobody listens.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Batcher:
    def __init__(
        self,
        engine_factory: Callable[[], EngineLike],
        scheduler: Scheduler,
        metrics: Metrics,
        warmup: EngineRequest | None = None,
        on_ready: Callable[[EngineLike], None] | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        row_limit: Callable[[BatchKey], int | None] | None = None,
        separate_adapters: bool = False,
    ) -> None:
        self._engine_factory = engine_factory
        self._scheduler = scheduler
        self._metrics = metrics
        self._warmup = warmup
        self._on_ready = on_ready
        self._on_failure = on_failure
        self._clock = clock
        self._row_limit = row_limit  # what fits on the device, per shape (memory probe)
        self._limited_keys: set[BatchKey] = set()
        self._separate_adapters = separate_adapters  # adapter_batching = "separate"
        self._cond = threading.Condition()
        self._handles: dict[str, RequestHandle] = {}  # by ticket
        self._tickets = itertools.count()
        self._cancel_running: set[str] = set()
        self._commands: list[Command] = []
        self._ready = False
        self._draining = False
        self._stopping = False
        self._dead: BaseException | None = None
        self._step_seconds = 0.0
        self._step_budget: int | None = None  # None = run freely (see set_step_budget)
        self._prompt_stats_seen = PromptCacheStats()
        self._thread = threading.Thread(target=self._main, name="engine", daemon=True)

    # --- event-loop side ---

    def start(self) -> None:
        self._thread.start()

    @property
    def scheduler(self) -> Scheduler:
        """The queue policy this batcher drives (inspect it under no lock only when idle)."""
        return self._scheduler

    @property
    def ready(self) -> bool:
        return self._ready and not self._draining and self._dead is None

    @property
    def engine_running(self) -> bool:
        """Whether the engine thread is still alive (after `stop`: inside a long torch call,
        such as loading or compiling, that it cannot leave early)."""
        return self._thread.is_alive()

    def submit(
        self, params: GenerationParams, deadline: float | None, wants_progress: bool
    ) -> RequestHandle:
        """Queues a validated request; its events arrive on the returned handle.

        Raises:
            EngineUnavailable: the model is loading or the engine failed.
            Draining: the server is shutting down.
            QueueFull: no room (UNAVAILABLE).
            InvalidArgument: more images than one step at this size holds on the device.
        """
        loop = asyncio.get_running_loop()
        with self._cond:
            self._check_accepting()
            now = self._clock()
            ticket = f"{next(self._tickets)}:{params.request_id}"
            handle = RequestHandle(ticket, params, loop, wants_progress, accepted_at=now)
            key = params.adapter_batch_key if self._separate_adapters else params.batch_key
            entry = QueueEntry(
                request_id=ticket,
                key=key,
                rows=params.num_images,
                steps=params.steps,
                priority=params.priority,
                arrival=now,
                deadline=deadline,
            )
            self._cap_rows(key)
            self._check_fits(params, key)
            shed = self._scheduler.add(entry, now)
            self._handles[ticket] = handle
            if shed is not None:
                self._fail(shed.request_id, Shed("shed for a higher-priority request; retry later"))
            if wants_progress:
                self._report_positions()
            self._metrics.pending.set(self._scheduler.waiting_count)
            self._cond.notify_all()
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        """The caller gave up (cancelled, disconnected or past its deadline).

        A queued request is removed and never reaches the engine; a running one loses its rows at
        the next step boundary.
        """
        with self._cond:
            if self._forget(handle.ticket) is None:
                return
            if self._scheduler.cancel(handle.ticket) == "running":
                self._cancel_running.add(handle.ticket)
            self._metrics.pending.set(self._scheduler.waiting_count)
            self._cond.notify_all()

    async def call_on_engine(self, command: Callable[[EngineLike], T]) -> T:
        """Runs `command(engine)` on the engine thread at the next step boundary.

        The way to change the model while serving (loading an adapter, say) without racing a
        step in progress.

        Raises:
            EngineUnavailable: the server is stopping, the engine failed, or the command (or one
                queued with it) killed the engine thread.
            Exception: whatever the command raised; the engine goes on.
        """
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._cond:
            if self._dead is not None:
                raise EngineUnavailable("engine failed; this replica cannot serve")
            if self._stopping:  # the engine thread will not run it
                raise EngineUnavailable("server stopping")
            self._commands.append(Command(command, future))
            self._cond.notify_all()
        result: T = await asyncio.wrap_future(future)
        return result

    def set_step_budget(self, steps: int | None) -> None:
        """Holds the engine at a step boundary after `steps` more steps (None = run freely).

        Lets tests place requests at exact step boundaries without timing, and lets an operator
        freeze the engine while inspecting it. Deadlines and cancellations still apply.
        """
        with self._cond:
            self._step_budget = steps
            self._cond.notify_all()

    def begin_drain(self) -> None:
        """Refuses new requests from now on; queued and running ones still finish."""
        with self._cond:
            self._draining = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """Waits until no request is queued or running; False if `timeout_s` passed first."""
        return await asyncio.get_running_loop().run_in_executor(None, self._wait_idle, timeout_s)

    def _wait_idle(self, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._handles, timeout_s)

    def stop(self, timeout_s: float = 5.0, reason: str = "server stopping") -> None:
        """Stops the engine thread, waiting for it up to `timeout_s`; requests still waiting get
        UNAVAILABLE with `reason`."""
        with self._cond:
            self._stopping = True
            for request_id in list(self._handles):
                self._fail(request_id, EngineUnavailable(reason))
            self._abandon_commands()
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _abandon_commands(self) -> None:
        """Answers queued engine commands that will never run (lock held)."""
        _abandon(self._commands)
        self._commands = []

    def _cap_rows(self, key: BatchKey) -> None:
        """The first request of a shape caps that shape's batches at what fits (lock held)."""
        if self._row_limit is None or key in self._limited_keys:
            return
        self._limited_keys.add(key)
        limit = self._row_limit(key)
        if limit is not None:
            self._scheduler.set_row_limit(key, limit)

    def _check_fits(self, params: GenerationParams, key: Hashable) -> None:
        """A request's images step together, so more than fit on the device would run out of
        memory at every step (lock held)."""
        fitting = self._scheduler.fitting_rows(key)
        if params.num_images > fitting:
            raise InvalidArgument(
                "num_images",
                f"{params.num_images} outside [1, {fitting}]: at most {fitting} images of "
                f"{params.width}x{params.height} fit in one step on this device",
            )

    def _check_accepting(self) -> None:
        if self._dead is not None:
            raise EngineUnavailable("engine failed; this replica cannot serve")
        if self._draining or self._stopping:
            raise Draining("server draining; retry on another replica")
        if not self._ready:
            raise EngineUnavailable("model loading; retry shortly")

    # --- engine thread ---

    def _main(self) -> None:
        try:
            engine = self._engine_factory()
            if self._warmup is not None:
                self._warm_up(engine, self._warmup)
            with self._cond:
                # A drain or stop that began during start-up: this replica is never ready.
                self._ready = not (self._stopping or self._draining)
            if self._ready:
                log.info("engine ready")
                if self._on_ready is not None:
                    self._on_ready(engine)
            self._loop(engine)
        except BaseException as error:  # the engine thread must never die silently
            log.exception("engine thread failed")
            with self._cond:
                self._dead = error
                for request_id in list(self._handles):
                    self._fail(
                        request_id, EngineUnavailable("engine failed; retry on another replica")
                    )
                self._abandon_commands()
            if self._on_failure is not None:
                self._on_failure(error)

    def _warm_up(self, engine: EngineLike, request: EngineRequest) -> None:
        """Runs one request through the engine before serving, honouring the step budget.

        Its steps seed the step-time estimate but stay out of the request metrics: no client
        sent it, and a device's first calls (kernel selection, allocator growth) are outliers.
        Their time is the `warmup_seconds` gauge instead."""
        group = ("warm-up",)
        if self._stop_requested():  # stopped while the model loaded: no prompt to encode
            return
        started = time.perf_counter()
        engine.add(group, [request])
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._step_budget != 0 or self._stopping)
                if self._stopping:
                    return
            result = engine.step(group)
            self._count_step(result)
            if result.failed:
                raise RuntimeError("the warm-up batch failed; see the log above")
            if result.finished:
                break
        self._metrics.warmup_seconds.set(time.perf_counter() - started)

    def _stop_requested(self) -> bool:
        with self._cond:
            return self._stopping

    def _loop(self, engine: EngineLike) -> None:
        while True:
            with self._cond:
                plan, dropped = self._next_plan()
                if plan is None:
                    return
                commands, self._commands = self._commands, []
            try:
                for request_id in dropped:  # cancelled or expired while running
                    engine.cancel(request_id)
                for command in commands:  # after the drops: they may free memory
                    _run_command(engine, command)
            except BaseException:  # fatal for the thread; the callers of the rest must not hang
                _abandon(commands)
                raise
            if plan.group is not None:
                self._run_step(engine, plan)

    def _next_plan(self) -> tuple[StepPlan | None, list[str]]:
        """Waits (lock held) until there is a step to run or rows to drop; None when stopping."""
        while True:
            if self._stopping:
                return None, []
            dropped = list(self._cancel_running)
            self._cancel_running.clear()
            for request_id in dropped:
                self._scheduler.finish(request_id)
            dropped += self._expire(self._scheduler.expire(self._clock()))
            plan = StepPlan() if self._step_budget == 0 else self._scheduler.schedule(self._clock())
            self._metrics.pending.set(self._scheduler.waiting_count)
            self._metrics.running_rows.set(self._scheduler.running_rows)  # some may have left
            if plan.group is not None or dropped or self._commands:
                return plan, dropped
            wake_at = plan.wake_at if self._step_budget != 0 else self._scheduler.next_deadline()
            # (a command queued while waiting wakes this through notify_all)
            self._cond.wait(None if wake_at is None else max(0.0, wake_at - self._clock()))

    def _expire(self, expired: Expired) -> list[str]:
        """Fails expired requests (lock held); returns the running ones, whose rows must go."""
        for entry in expired.queued + expired.running:
            self._fail(
                entry.request_id, DeadlineExceeded(f"deadline passed after {self._age(entry):.3f}s")
            )
        return [entry.request_id for entry in expired.running]

    def _run_step(self, engine: EngineLike, plan: StepPlan) -> None:
        group = plan.group
        stepped = plan.stepped
        try:
            if plan.admitted:
                requests = self._start_admitted(plan)
                added = engine.add(group, requests) if requests else AddResult({})
                self._observe_stages(added.stage_seconds)
                self._fail_requests(added.failed)
                # A chosen request that was cancelled since the plan, or failed to encode, has
                # no rows to step (with none left, every row of the batch steps).
                wanted = {request.request_id for request in requests}
                gone = ({entry.request_id for entry in plan.admitted} - wanted) | set(added.failed)
                if stepped is not None:
                    stepped = [rid for rid in stepped if rid not in gone] or None
            if not engine.has_work(group):  # every admitted request failed or left
                return
            result = engine.step(group, stepped)
        except Exception:  # the engine isolates model errors per row; this is anything else
            log.exception("batch %s failed", group)
            self._fail_group(engine, group)
            return
        now = self._clock()
        self._observe_step(result)
        self._observe_prompt_cache(engine.prompt_stats)
        self._fail_requests(result.failed)
        with self._cond:
            if result.out_of_memory_rows is not None:
                log.warning(
                    "out of memory at %s: capping it at %d rows",
                    result.key,
                    result.out_of_memory_rows,
                )
                key = self._scheduler.key_of(group)  # with adapter names under "separate"
                self._scheduler.out_of_memory(key, result.out_of_memory_rows, now)
            self._scheduler.recover_row_limits(now)
            self._scheduler.step_done(group, stepped)
            if result.out_of_memory_rows is None and not result.failed:  # a clean timing
                self._scheduler.observe_step(
                    group, result.batch_size, result.stage_seconds["denoise_step"]
                )
            for progress in result.progress:
                handle = self._handles.get(progress.request_id)
                if handle is None:
                    continue
                self._note_step(handle, result.batch_size)
                if handle.wants_progress:
                    handle.emit(StepEvent(progress.step, progress.total_steps, progress.previews))
            for finished in result.finished:
                self._scheduler.finish(finished.request_id)
                self._complete(finished.request_id, finished.images, now)
            self._report_positions()

    def _observe_step(self, result: StepResult) -> None:
        """Step time estimate, the step budget and metrics, after every serving step."""
        self._count_step(result)
        self._observe_stages(result.stage_seconds)
        self._observe_adapters(result.adapter_rows)
        self._metrics.batch_size.observe(result.batch_size)
        self._metrics.deferred_rows.inc(result.deferred_rows)

    def _count_step(self, result: StepResult) -> None:
        """Step time estimate and the step budget, after every engine step (warm-up too)."""
        step_s = result.stage_seconds["denoise_step"]
        if self._step_seconds == 0:
            self._step_seconds = step_s
        else:
            self._step_seconds += STEP_TIME_SMOOTHING * (step_s - self._step_seconds)
        with self._cond:
            if self._step_budget is not None:
                self._step_budget = max(0, self._step_budget - 1)

    def _start_admitted(self, plan: StepPlan) -> list[EngineRequest]:
        """Marks the requests the plan admitted as started; returns the engine requests of those
        whose caller still waits.

        Queue time ends at admission, before the prompt is encoded: encoding and the first step
        are compute, not waiting. A request cancelled between the plan and now (commands run in
        between) is already in `_cancel_running`: its entry goes at the next boundary, and it
        never reaches the engine.
        """
        now = self._clock()
        requests = []
        with self._cond:
            batch_size = sum(entry.rows for entry in self._scheduler.running_in(plan.group))
            for entry in plan.admitted:  # admitted once: none of them has started yet
                handle = self._handles.get(entry.request_id)
                if handle is None:
                    continue
                requests.append(EngineRequest(entry.request_id, handle.params))
                handle.started_at = now
                queued = now - handle.accepted_at
                self._metrics.queue_time.observe(queued)
                if handle.wants_progress:
                    handle.emit(StartedEvent(batch_size=batch_size, queued_s=queued))
        return requests

    def _note_step(self, handle: RequestHandle, batch_size: int) -> None:
        handle.steps_run += 1
        handle.rows_seen += batch_size
        handle.max_batch = max(handle.max_batch, batch_size)

    def _complete(self, request_id: str, images: list[GeneratedImage], now: float) -> None:
        handle = self._forget(request_id)
        if handle is None:  # cancelled while its last step ran
            return
        started = handle.started_at if handle.started_at is not None else now
        self._metrics.compute_time.observe(now - started)
        handle.emit(
            CompletedEvent(
                images=images,
                queued_s=started - handle.accepted_at,
                compute_s=now - started,
                max_batch_size=handle.max_batch,
                mean_batch_size=handle.rows_seen / max(1, handle.steps_run),
            )
        )

    def _fail(self, request_id: str, error: ImageGenError) -> None:
        """Ends a request with an error (lock held)."""
        handle = self._forget(request_id)
        if handle is not None:
            handle.emit(FailedEvent(error))

    def _forget(self, request_id: str) -> RequestHandle | None:
        """Drops a request's handle (lock held); wakes drain waiters when none are left."""
        handle = self._handles.pop(request_id, None)
        if not self._handles:
            self._cond.notify_all()
        return handle

    def _fail_requests(self, request_ids: list[str]) -> None:
        """Requests the engine lost to a model error: INTERNAL, with details in the log."""
        if not request_ids:
            return
        with self._cond:
            for request_id in request_ids:
                self._scheduler.finish(request_id)
                self._fail(request_id, InternalError("generation failed; see the server log"))

    def _fail_group(self, engine: EngineLike, group: Hashable) -> None:
        with self._cond:
            members = [entry.request_id for entry in self._scheduler.running_in(group)]
            for request_id in members:
                self._scheduler.finish(request_id)
                self._fail(request_id, InternalError("generation failed; see the server log"))
        for request_id in members:
            engine.cancel(request_id)

    def _report_positions(self) -> None:
        """Sends queued events to streaming requests whose queue position changed (lock held)."""
        for request_id, estimate in self._scheduler.estimates(self._step_seconds).items():
            handle = self._handles.get(request_id)
            if (
                handle is None
                or not handle.wants_progress
                or handle.last_position == estimate.position
            ):
                continue
            handle.last_position = estimate.position
            handle.emit(QueuedEvent(estimate.position, estimate.start_in_s))

    def _observe_adapters(self, adapter_rows: dict[str, int]) -> None:
        for name, rows in adapter_rows.items():
            self._metrics.adapter_rows.labels(adapter=name).inc(rows)

    def _observe_stages(self, stage_seconds: dict[str, float]) -> None:
        for stage, seconds in stage_seconds.items():
            self._metrics.stage.labels(stage=stage).observe(seconds)

    def _observe_prompt_cache(self, stats: PromptCacheStats) -> None:
        seen = self._prompt_stats_seen
        self._metrics.prompt_cache_hits.inc(stats.hits - seen.hits)
        self._metrics.prompt_cache_misses.inc(stats.misses - seen.misses)
        self._prompt_stats_seen = PromptCacheStats(stats.hits, stats.misses)

    def _age(self, entry: QueueEntry) -> float:
        return self._clock() - entry.arrival


def _abandon(commands: list[Command]) -> None:
    """Answers the commands that did not run: they never will.

    The caller took them from the queue, so none is running: each is answered (it ran), pending,
    or cancelled by its caller, which can happen at any moment (asyncio.wrap_future cancels it
    when the awaiting task is cancelled). `set_running_or_notify_cancel` settles pending against
    cancelled atomically, where `done()` then `set_exception` would race the cancel.
    """
    for command in commands:
        future = command.future
        if not future.done() and future.set_running_or_notify_cancel():
            future.set_exception(EngineUnavailable("engine stopped"))


def _run_command(engine: EngineLike, command: Command) -> None:
    future = command.future
    if not future.set_running_or_notify_cancel():  # its caller gave up before it ran
        return
    try:
        future.set_result(command.run(engine))
    except Exception as error:  # the caller gets it; the engine goes on
        future.set_exception(error)
    except BaseException as error:  # fatal for the thread, but its caller must not hang
        future.set_exception(EngineUnavailable(f"engine stopped: {error!r}"))
        raise
