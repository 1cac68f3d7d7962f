"""Functions the event loop asks the engine thread to run at a step boundary (loading an
adapter, say), and how each is answered exactly once (see `Batcher.call_on_engine`)."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..base.engine_api import EngineLike
from ..base.errors import EngineUnavailable


@dataclass(slots=True)
class Command:
    """A function to run on the engine thread at a step boundary."""

    run: Callable[[EngineLike], Any]  # called with the engine, on the engine thread
    # What its caller awaits. Its caller may cancel it while it waits; only the thread that took
    # the command from the queue (under the lock) moves it to running and answers it.
    future: concurrent.futures.Future[Any]


def abandon(commands: list[Command]) -> None:
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


def run_command(engine: EngineLike, command: Command) -> None:
    """Runs one command and answers its caller (an Exception goes to the caller; anything
    else kills the thread, after answering)."""
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
