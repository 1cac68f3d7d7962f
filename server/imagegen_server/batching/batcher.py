"""The bridge between the asyncio service and the engine thread.

The service calls `submit` and `cancel` on the event loop; one engine thread loads the model,
warms it up, then loops over step boundaries as nano-vllm's `LLMEngine.step` does: plan (the
scheduler, under one lock), run (the engine, outside the lock), update (the scheduler, under the
lock), emit (events to the callers). Events reach each request's `asyncio.Queue` through
`loop.call_soon_threadsafe` (requests.py), the one hand-off in that direction; the engine thread
never touches gRPC objects and the event loop never touches torch.

Contract: every accepted request gets exactly one terminal event (`CompletedEvent` or
`FailedEvent`), unless its caller cancelled it, in which case the caller already has its answer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ..base.engine_api import AddResult, EngineLike, EngineRequest, StepResult
from ..base.errors import (
    DeadlineExceeded,
    Draining,
    EngineUnavailable,
    InternalError,
    Shed,
)
from ..base.metrics import Metrics
from ..base.request import Request
from ..base.types import BatchKey, GenerationParams
from .commands import Command, abandon, run_command
from .plan import Settled, StepOutcome, StepPlan
from .recorder import Recorder
from .requests import RequestHandle, RequestTable
from .scheduler import Scheduler

log = logging.getLogger(__name__)

T = TypeVar("T")


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
        self._recorder = Recorder(metrics)
        self._warmup = warmup
        self._on_ready = on_ready
        self._on_failure = on_failure
        self._clock = clock
        self._row_limit = row_limit  # what fits on the device, per shape (memory probe)
        self._separate_adapters = separate_adapters  # adapter_batching = "separate"
        self._cond = threading.Condition()
        self._requests = RequestTable(on_empty=self._cond.notify_all)
        self._tickets = itertools.count()
        self._commands: list[Command] = []
        self._ready = False
        self._draining = False
        self._stopping = False
        self._dead: BaseException | None = None
        self._step_budget: int | None = None  # None = run freely (see set_step_budget)
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
        self,
        params: GenerationParams,
        deadline: float | None,
        wants_progress: bool,
        tenant: str = "",
        weight: float = 1.0,
        traced: bool = False,
    ) -> RequestHandle:
        """Queues a validated request, billed to `tenant` with its share `weight` (fair share:
        batching/fair_share.py), logging its steps when `traced`; its events arrive on the
        returned handle.

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
            key = params.adapter_batch_key if self._separate_adapters else params.batch_key
            ticket = f"{next(self._tickets)}:{params.request_id}"
            request = Request(ticket, params, key, arrival=now, deadline=deadline)
            request.tenant, request.weight = tenant, weight
            request.step_log = [] if traced else None
            if self._row_limit is not None:
                self._scheduler.row_limits.probe_once(key, self._row_limit)
            size = f"{params.width}x{params.height}"
            self._scheduler.row_limits.check_fits(key, params.num_images, size)
            shed = self._scheduler.add(request, now)
            handle = RequestHandle(request, loop, wants_progress)
            self._requests.add(handle)
            if shed is not None:
                self._requests.fail(
                    shed.ticket, Shed("shed for a higher-priority request; retry later")
                )
            if wants_progress:
                self._report_positions()
            self._recorder.pending(self._scheduler)
            self._cond.notify_all()
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        """The caller gave up (cancelled, disconnected or past its deadline).

        A queued request is removed and never reaches the engine; a running one loses its rows at
        the next step boundary.
        """
        with self._cond:
            if self._requests.forget(handle.ticket) is None:
                return
            self._scheduler.cancel(handle.ticket)
            self._recorder.pending(self._scheduler)
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
            return self._cond.wait_for(lambda: not self._requests, timeout_s)

    def stop(self, timeout_s: float = 5.0, reason: str = "server stopping") -> None:
        """Stops the engine thread, waiting for it up to `timeout_s`; requests still waiting get
        UNAVAILABLE with `reason`."""
        with self._cond:
            self._stopping = True
            self._requests.fail_all(EngineUnavailable(reason))
            self._abandon_commands()
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _abandon_commands(self) -> None:
        """Answers queued engine commands that will never run (lock held)."""
        abandon(self._commands)
        self._commands = []

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
                self._requests.fail_all(
                    EngineUnavailable("engine failed; retry on another replica")
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
            self._spend_step(result)
            if result.failed:
                raise RuntimeError("the warm-up batch failed; see the log above")
            if result.finished:
                break
        self._recorder.warmed_up(time.perf_counter() - started)

    def _stop_requested(self) -> bool:
        with self._cond:
            return self._stopping

    def _loop(self, engine: EngineLike) -> None:
        """Step boundaries until stopped: plan, drop leavers and run commands, then step."""
        while True:
            with self._cond:
                plan = self._next_plan()
                if plan is None:
                    return
                commands, self._commands = self._commands, []
            self._between_steps(engine, plan.dropped, commands)
            if plan.group is not None:
                self._step(engine, plan)

    def _next_plan(self) -> StepPlan | None:
        """Waits (lock held) until there is a step to run, rows to drop or a command to run;
        None when stopping."""
        while True:
            if self._stopping:
                return None
            plan = self._scheduler.plan(self._clock(), may_step=self._step_budget != 0)
            self._fail_expired(plan.expired)
            self._recorder.queue(self._scheduler)  # rows may have left
            if plan.group is not None or plan.dropped or self._commands:
                return plan
            # (a command queued while waiting wakes this through notify_all)
            self._cond.wait(
                None if plan.wake_at is None else max(0.0, plan.wake_at - self._clock())
            )

    def _between_steps(
        self, engine: EngineLike, dropped: list[str], commands: list[Command]
    ) -> None:
        """Drops the rows of requests that left, then runs the queued commands (after the
        drops: they may free memory)."""
        try:
            for ticket in dropped:
                engine.cancel(ticket)
            for command in commands:
                run_command(engine, command)
        except BaseException:  # fatal for the thread; the callers of the rest must not hang
            abandon(commands)
            raise

    def _step(self, engine: EngineLike, plan: StepPlan) -> None:
        """One step of the planned batch: run it, update the scheduler, emit events."""
        outcome, result = self._run(engine, plan)
        now = self._clock()
        if result is not None:
            self._spend_step(result)
            self._recorder.step(result, engine.prompt_stats)
        with self._cond:
            settled = self._scheduler.update(plan, outcome, now)
            self._emit(settled, result, now)
        if outcome.batch_failed:  # the rows of a broken batch must not step again
            for request in settled.failed:
                engine.cancel(request.ticket)

    def _run(self, engine: EngineLike, plan: StepPlan) -> tuple[StepOutcome, StepResult | None]:
        """Runs the plan on the engine (outside the lock); the result is None if no step ran."""
        outcome = StepOutcome(stepped=plan.stepped)
        try:
            if plan.admitted:
                self._add_admitted(engine, plan, outcome)
            if not engine.has_work(plan.group):  # every admitted request failed or left
                return outcome, None
            result = engine.step(plan.group, outcome.stepped)
        except Exception:  # the engine isolates model errors per row; this is anything else
            log.exception("batch %s failed", plan.group)
            outcome.batch_failed = True
            return outcome, None
        outcome.rows = result.batch_size
        outcome.seconds = result.stage_seconds["denoise_step"]
        outcome.finished = [finished.request_id for finished in result.finished]
        outcome.failed = list(result.failed)
        outcome.out_of_memory_rows = result.out_of_memory_rows
        return outcome, result

    def _add_admitted(self, engine: EngineLike, plan: StepPlan, outcome: StepOutcome) -> None:
        """Puts the plan's admitted requests into the engine's batch, before its step."""
        requests = self._start_admitted(plan)
        added = engine.add(plan.group, requests) if requests else AddResult({})
        self._recorder.stages(added.stage_seconds)
        outcome.failed_to_start = list(added.failed)
        if added.failed:  # their callers hear at once; `update` settles them in the scheduler
            with self._cond:
                self._fail_lost(added.failed)
        # A chosen request that was cancelled since the plan, or failed to encode, has no rows
        # to step (with none left, every row of the batch steps).
        wanted = {request.request_id for request in requests}
        gone = ({request.ticket for request in plan.admitted} - wanted) | set(added.failed)
        if outcome.stepped is not None:
            outcome.stepped = [ticket for ticket in outcome.stepped if ticket not in gone] or None

    def _start_admitted(self, plan: StepPlan) -> list[EngineRequest]:
        """Marks the requests the plan admitted as started; returns the engine requests of those
        whose caller still waits.

        Queue time ends at admission, before the prompt is encoded: encoding and the first step
        are compute, not waiting. A request cancelled between the plan and now (commands run in
        between) has left the request table: the next plan drops it, and it never reaches the
        engine.
        """
        now = self._clock()
        requests = []
        with self._cond:
            batch_rows = sum(request.rows for request in self._scheduler.running_in(plan.group))
            for request in plan.admitted:  # admitted once: none of them has started yet
                if self._requests.get(request.ticket) is None:
                    continue
                requests.append(request.engine_request())
                request.started_at = now
                queued = now - request.arrival
                self._recorder.started(queued)
                self._requests.start(request, batch_rows, queued)
        return requests

    def _emit(self, settled: Settled, result: StepResult | None, now: float) -> None:
        """Tells the callers what the step did (lock held)."""
        self._fail_lost([request.ticket for request in settled.failed])
        if result is None:
            return
        self._requests.send_steps(result.progress)
        images = {finished.request_id: finished.images for finished in result.finished}
        for request in settled.finished:
            # Recorded before its caller hears: a client that reads the metrics after its call
            # ended must find the request counted.
            if self._requests.get(request.ticket) is not None:
                self._recorder.completed(request, now)
            self._requests.complete(request, images[request.ticket], now)
        self._report_positions()

    def _spend_step(self, result: StepResult) -> None:
        """Step time estimate and the step budget, after every engine step (warm-up too)."""
        self._recorder.time_step(result)
        with self._cond:
            if self._step_budget is not None:
                self._step_budget = max(0, self._step_budget - 1)

    def _fail_expired(self, expired: list[Request]) -> None:
        """Requests past their deadlines: DEADLINE_EXCEEDED (lock held)."""
        for request in expired:
            age = self._clock() - request.arrival
            self._requests.fail(
                request.ticket, DeadlineExceeded(f"deadline passed after {age:.3f}s")
            )

    def _fail_lost(self, tickets: list[str]) -> None:
        """Requests lost to a model error: INTERNAL, with details in the log (lock held)."""
        for ticket in tickets:
            self._requests.fail(ticket, InternalError("generation failed; see the server log"))

    def _report_positions(self) -> None:
        """Queued events to streaming requests whose queue position changed (lock held)."""
        self._requests.send_positions(self._scheduler.estimates(self._recorder.step_seconds))
