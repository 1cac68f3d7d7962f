"""The batcher between the event loop and a real engine (the tiny model), where the gRPC layer
cannot place events exactly: a cancel inside the window between a request's admission and its
rows reaching the engine, a request larger than the device holds, and engine commands when the
engine thread dies or the server stops.

Engine commands (`call_on_engine`) run on the engine thread in that very window, so a command
that waits on a gate holds the engine there, without timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from imagegen_server.base.errors import EngineUnavailable, InvalidArgument
from imagegen_server.base.metrics import Metrics
from imagegen_server.base.types import BatchKey, CompletedEvent, Event, FailedEvent, StepEvent
from imagegen_server.batching.batcher import Batcher
from imagegen_server.batching.requests import RequestHandle
from imagegen_server.batching.scheduler import Scheduler, SchedulerConfig
from imagegen_server.engine.engine import Engine
from imagegen_server.engine.model import load_model
from support import engine_params

TIMEOUT_S = 60.0


@contextlib.asynccontextmanager
async def running_batcher(
    tiny_model: Path,
    row_limit: Callable[[BatchKey], int | None] | None = None,
    on_failure: Callable[[BaseException], None] | None = None,
    metrics: Metrics | None = None,
) -> AsyncIterator[Batcher]:
    """A started batcher around a real engine, ready to serve; stopped on the way out."""
    ready = threading.Event()
    batcher = Batcher(
        engine_factory=lambda: Engine(load_model(str(tiny_model), device="cpu"), 16, 512),
        scheduler=Scheduler(SchedulerConfig(policy="step", max_batch_size=4)),
        metrics=metrics or Metrics(),
        on_ready=lambda _engine: ready.set(),
        on_failure=on_failure,
        row_limit=row_limit,
    )
    batcher.start()
    try:
        assert await asyncio.to_thread(ready.wait, TIMEOUT_S)
        yield batcher
    finally:
        batcher.stop()


async def terminal(handle: RequestHandle) -> Event:
    while True:
        event = await asyncio.wait_for(handle.events.get(), TIMEOUT_S)
        if isinstance(event, (CompletedEvent, FailedEvent)):
            return event


class Gate:
    """An engine command that holds the engine thread until opened."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()

    def __call__(self, engine: Any) -> None:
        self.entered.set()
        assert self.opened.wait(TIMEOUT_S)

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, TIMEOUT_S)


def test_a_cancel_between_admission_and_the_engine_fails_nobody_else(tiny_model: Path) -> None:
    async def scenario() -> None:
        async with running_batcher(tiny_model) as batcher:
            first, second = Gate(), Gate()
            held = asyncio.ensure_future(batcher.call_on_engine(first))
            await first.wait_entered()
            # Both requests and the second command wait for the engine; the next plan admits
            # the requests, and the second command runs after that plan, before their rows
            # reach the engine.
            cancelled = batcher.submit(engine_params("cancelled"), None, False)
            kept = batcher.submit(engine_params("kept"), None, False)
            holding = asyncio.ensure_future(batcher.call_on_engine(second))
            await asyncio.sleep(0)  # one loop turn: the task queues its command, no timing
            first.opened.set()
            await second.wait_entered()
            assert batcher.scheduler.running_rows == 2  # both admitted; the engine is held
            batcher.cancel(cancelled)
            second.opened.set()
            await asyncio.gather(held, holding)

            event = await terminal(kept)
            assert isinstance(event, CompletedEvent), event
            (image,) = event.images
            assert image.pixels.shape == (64, 64, 3) and np.ptp(image.pixels) > 0
            assert cancelled.events.empty()  # its caller already has its answer
            # The cancelled request left the scheduler and never reached the engine.
            leftover = await batcher.call_on_engine(
                lambda engine: (engine.has_work(), batcher.scheduler.running_rows)
            )
            assert leftover == (False, 0)

    asyncio.run(scenario())


def test_rows_that_leave_between_steps_leave_the_running_rows_gauge(tiny_model: Path) -> None:
    async def scenario() -> None:
        metrics = Metrics()
        async with running_batcher(tiny_model, metrics=metrics) as batcher:
            batcher.set_step_budget(1)
            handle = batcher.submit(engine_params("leaves"), None, True)
            while not isinstance(await asyncio.wait_for(handle.events.get(), TIMEOUT_S), StepEvent):
                pass
            await batcher.call_on_engine(lambda engine: None)  # the step's bookkeeping is done
            running = "imagegen_running_rows"
            assert metrics.registry.get_sample_value(running) == 1
            batcher.cancel(handle)  # no step follows: the engine is held at the boundary
            await batcher.call_on_engine(lambda engine: None)  # that boundary has passed
            assert metrics.registry.get_sample_value(running) == 0

    asyncio.run(scenario())


def test_more_images_than_fit_in_one_step_are_refused_naming_the_range(tiny_model: Path) -> None:
    async def scenario() -> None:
        async with running_batcher(tiny_model, row_limit=lambda key: 2) as batcher:
            with pytest.raises(InvalidArgument) as refused:
                batcher.submit(engine_params("three", num_images=3), None, False)
            assert refused.value.message == (
                "num_images: 3 outside [1, 2]: at most 2 images of 64x64 fit in one step on "
                "this device"
            )
            event = await terminal(batcher.submit(engine_params("two", num_images=2), None, False))
            assert isinstance(event, CompletedEvent) and len(event.images) == 2
            assert event.max_batch_size == 2

    asyncio.run(scenario())


def test_a_command_whose_caller_gave_up_before_it_ran_is_skipped(tiny_model: Path) -> None:
    async def scenario() -> None:
        async with running_batcher(tiny_model) as batcher:
            gate = Gate()
            held = asyncio.ensure_future(batcher.call_on_engine(gate))
            await gate.wait_entered()
            ran = threading.Event()
            abandoned = asyncio.ensure_future(batcher.call_on_engine(lambda engine: ran.set()))
            await asyncio.sleep(0)  # one loop turn: the task queues its command, no timing
            abandoned.cancel()  # a deadline or a disconnect, before the engine got to it
            with contextlib.suppress(asyncio.CancelledError):
                await abandoned  # done: the cancel has reached the command's future
            gate.opened.set()
            await held
            assert await batcher.call_on_engine(lambda engine: "alive") == "alive"
            assert not ran.is_set()

    asyncio.run(scenario())


class Fatal(BaseException):
    """What kills the engine thread (not an Exception, which a command's caller would get)."""


def test_commands_queued_behind_one_that_kills_the_engine_are_answered(tiny_model: Path) -> None:
    async def scenario() -> None:
        failures: list[BaseException] = []
        failed = threading.Event()

        def on_failure(error: BaseException) -> None:
            failures.append(error)
            failed.set()

        async with running_batcher(tiny_model, on_failure=on_failure) as batcher:
            gate = Gate()
            held = asyncio.ensure_future(batcher.call_on_engine(gate))
            await gate.wait_entered()
            fatal = asyncio.ensure_future(batcher.call_on_engine(_raise_fatal))
            after = asyncio.ensure_future(batcher.call_on_engine(lambda engine: "ran"))
            await asyncio.sleep(0)  # one loop turn: both tasks queue their commands, no timing
            gate.opened.set()
            await held
            for command in (fatal, after):  # the same engine iteration took both
                with pytest.raises(EngineUnavailable):
                    await asyncio.wait_for(command, TIMEOUT_S)
            # The thread reports its death after answering them.
            assert await asyncio.to_thread(failed.wait, TIMEOUT_S)
            assert [type(error) for error in failures] == [Fatal]
            with pytest.raises(EngineUnavailable, match="cannot serve"):
                await batcher.call_on_engine(lambda engine: "too late")

    asyncio.run(scenario())


def test_a_command_after_stop_is_refused_instead_of_waiting_forever(tiny_model: Path) -> None:
    async def scenario() -> None:
        async with running_batcher(tiny_model) as batcher:
            batcher.stop()
            with pytest.raises(EngineUnavailable, match="server stopping"):
                await asyncio.wait_for(batcher.call_on_engine(lambda engine: "never"), TIMEOUT_S)

    asyncio.run(scenario())


def _raise_fatal(engine: Any) -> None:
    raise Fatal("the engine thread dies here")
