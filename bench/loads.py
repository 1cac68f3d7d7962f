"""Load generators: closed loop (N clients, each sends its next request when the last returns) and
open loop (Poisson arrivals at a fixed rate, whatever the server does).

Both run in the benchmark's event loop on one gRPC channel, so the load generator costs little
CPU next to the server. Every request asks for one image, with its own prompt (no prompt-cache
hits) and seed, and is sent once: the client's retries are off so a full queue shows up as
UNAVAILABLE in the results instead of as extra latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from imagegen_client import Adapter, AsyncImageGenClient, RetryPolicy

from .stats import OK, RequestRecord
from .workloads import RequestClass, reference_pictures

REQUEST_TIMEOUT_S = 600.0  # far beyond any run; the bench cancels what is left itself
FAILURE_PAUSE_S = 0.1  # a closed-loop client that got an error waits this before the next request
NO_RETRIES = RetryPolicy(max_attempts=1)

Picker = Callable[[int], RequestClass]  # request index -> its class


@dataclass(frozen=True, slots=True)
class ClosedLoop:
    clients: int
    duration_s: float  # clients stop sending at this time; requests still running are cut ...
    min_samples: int = 0  # ... unless fewer steady-state requests (not a client's first) are done
    max_duration_s: float = 0.0  # ... then they go on until there are, up to this long


@dataclass(frozen=True, slots=True)
class OpenLoop:
    rate_ips: float  # mean arrivals (= images) per second
    arrivals: int  # how many requests arrive, at Poisson times
    drain_cap_s: float  # after the last arrival, how long the bench waits before cutting


class LoadGenerator:
    """Sends requests of a workload to one server and records what happened to each."""

    def __init__(
        self,
        target: str,
        run_name: str,
        clock: Callable[[], float] = time.perf_counter,
        token: str | None = None,
    ) -> None:
        self._client = AsyncImageGenClient(
            target, timeout_s=REQUEST_TIMEOUT_S, retry=NO_RETRIES, token=token
        )
        self._run_name = run_name
        self._clock = clock

    async def close(self) -> None:
        await self._client.close()

    async def closed_loop(
        self, load: ClosedLoop, pick: Picker
    ) -> tuple[list[RequestRecord], float]:
        """`load.clients` clients send back to back; `pick(i)` is the class of the i-th request.

        They stop at `load.duration_s`, or later (up to `load.max_duration_s`) while fewer
        than `load.min_samples` steady-state requests have completed: a server slower than
        planned still yields samples. Returns the records and the time (from the start) the
        clients stopped; requests still running then are cut.
        """
        start = self._clock()
        records: list[RequestRecord] = []
        counter = itertools.count()

        steady = 0  # completed requests that were not a client's first
        enough = asyncio.Event()

        async def client(number: int) -> None:
            nonlocal steady
            first = True
            while True:
                index = next(counter)
                cls = pick(index)
                record = self._record(index, cls, start, client=number, first=first)
                records.append(record)
                await self._send(record, cls, start)
                if record.ok and not first:
                    steady += 1
                    if steady >= load.min_samples:
                        enough.set()
                first = False
                if not record.ok:
                    await asyncio.sleep(FAILURE_PAUSE_S)

        tasks = [asyncio.ensure_future(client(number)) for number in range(load.clients)]
        await asyncio.sleep(load.duration_s)
        overrun = max(0.0, load.max_duration_s - load.duration_s)
        if load.min_samples and not enough.is_set() and overrun:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(enough.wait(), overrun)
        stopped = self._clock() - start
        await _wait_then_cancel(tasks, 0.0)
        return records, stopped

    async def open_loop(
        self, load: OpenLoop, pick: Picker, seed: int
    ) -> tuple[list[RequestRecord], float]:
        """Sends `load.arrivals` requests at Poisson times; returns the records and the time
        (from the start) of the last arrival."""
        start = self._clock()
        records: list[RequestRecord] = []
        tasks: list[asyncio.Future[None]] = []
        for index, due in enumerate(arrival_times(load, seed)):
            await asyncio.sleep(max(0.0, start + due - self._clock()))
            cls = pick(index)
            record = self._record(index, cls, start)
            records.append(record)
            tasks.append(asyncio.ensure_future(self._send(record, cls, start)))
        last_arrival = self._clock() - start
        await _wait_then_cancel(tasks, load.drain_cap_s)
        return records, last_arrival

    async def send_one(self, cls: RequestClass, index: int) -> RequestRecord:
        """One request, nothing else in flight from here; its record (latency_s when OK)."""
        start = self._clock()
        record = self._record(index, cls, start)
        await self._send(record, cls, start)
        return record

    async def warm_up(self, classes: list[RequestClass]) -> None:
        """One request of each class at once (first-use costs of each shape), results unused."""
        start = self._clock()
        records = [self._record(i, cls, start) for i, cls in enumerate(classes)]
        await asyncio.gather(
            *(self._send(record, cls, start) for record, cls in zip(records, classes, strict=True))
        )
        failed = [record.code for record in records if not record.ok]
        if failed:
            raise RuntimeError(f"warm-up requests failed: {failed}")

    def _record(
        self, index: int, cls: RequestClass, start: float, client: int = -1, first: bool = False
    ) -> RequestRecord:
        return RequestRecord(
            index=index,
            steps=cls.steps,
            label=cls.label,
            issued_s=self._clock() - start,
            client=client,
            first_of_client=first,
        )

    async def _send(self, record: RequestRecord, cls: RequestClass, start: float) -> None:
        try:
            result = await self._client.generate(
                # Fixed-width numbers: every prompt of a run has the same length, as the
                # engine's in the limit have.
                f"{self._run_name} request {record.index:06d}: a lighthouse at dusk",
                width=cls.width,
                height=cls.height,
                steps=cls.steps,
                seed=record.index,
                num_images=1,
                adapters=[Adapter(cls.adapter)] if cls.adapter else (),
                variant=cls.variant,
                guidance_scale=cls.guidance_scale,
                reference_images=reference_pictures(cls.references),
            )
        except grpc.RpcError as error:
            record.finished_s = self._clock() - start
            record.code = error.code().name if error.code() is not None else "UNKNOWN"
            return
        record.finished_s = self._clock() - start
        record.code = OK
        record.queued_s = result.timings.queued_s
        record.compute_s = result.timings.compute_s
        record.mean_batch_size = result.mean_batch_size
        if len(result.images) != 1:
            record.code = "WRONG_IMAGE_COUNT"


def arrival_times(load: OpenLoop, seed: int) -> list[float]:
    """`load.arrivals` Poisson arrival times over exactly `arrivals / rate_ips` seconds.

    A Poisson process conditioned on n arrivals in [0, T] places them as n sorted uniform
    times, so the offered rate is exactly the one asked for, whatever the seed, and short runs
    of different systems are not compared at different realised rates.
    """
    rng = random.Random(seed)
    span = load.arrivals / load.rate_ips
    return sorted(rng.uniform(0, span) for _ in range(load.arrivals))


async def _wait_then_cancel(tasks: Sequence[asyncio.Future[None]], timeout_s: float) -> None:
    """Waits up to `timeout_s` for `tasks`, then cancels the rest (their records stay CUT)."""
    if not tasks:
        return
    _done, pending = await asyncio.wait(tasks, timeout=max(0.0, timeout_s))
    for task in pending:
        task.cancel()
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError):
            await task
