"""The adapter registry: which adapters are loaded and who is using them.

At most `max_loaded` are loaded; loading one more evicts the least recently used adapter that no
queued or running request holds. Requests hold their adapters from acceptance to their last
status, so an adapter in use is never evicted, and an unload waits for its holders to finish.
All methods run on the event loop; the weights themselves are loaded and dropped on the engine
thread, through `run_on_engine`.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..base.adapter_files import AdapterDirectory, AdapterFile
from ..base.errors import InvalidArgument, NotFound, RateLimited
from ..base.metrics import Metrics
from ..base.types import AdapterSpec

T = TypeVar("T")

# An eviction cannot free room while every loaded adapter is in use: the caller retries later.
BUSY_RETRY_S = 1.0


@dataclass(slots=True)
class _Loaded:
    file: AdapterFile
    holders: int = 0  # queued or running requests that named it
    unloading: asyncio.Event | None = None  # set once the last holder is gone
    last_used: float = field(default_factory=time.monotonic)


class AdapterRegistry:
    def __init__(
        self,
        directory: AdapterDirectory,
        max_loaded: int,
        run_on_engine: Callable[[Callable[[Any], Any]], Awaitable[Any]],
        metrics: Metrics,
    ) -> None:
        self.directory = directory
        self._max_loaded = max_loaded
        self._run_on_engine = run_on_engine
        self._metrics = metrics
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()  # least recently used first
        self._admin = asyncio.Lock()  # one load/unload at a time
        self._changes: set[asyncio.Future[Any]] = set()  # loads/unloads under way

    def selectable(self) -> set[str]:
        """Names a request may use now (loaded, not being unloaded)."""
        return {name for name, entry in self._loaded.items() if entry.unloading is None}

    def loaded_files(self) -> list[AdapterFile]:
        return [entry.file for entry in self._loaded.values()]

    def hold(self, specs: Iterable[AdapterSpec]) -> None:
        """A request accepted with these adapters: they stay loaded until `release`."""
        for spec in specs:
            entry = self._loaded[spec.name]
            entry.holders += 1
            entry.last_used = time.monotonic()
            self._loaded.move_to_end(spec.name)

    def release(self, specs: Iterable[AdapterSpec]) -> None:
        for spec in specs:
            entry = self._loaded.get(spec.name)
            if entry is None:
                continue
            entry.holders -= 1
            if entry.holders == 0 and entry.unloading is not None:
                entry.unloading.set()

    async def load(self, name: str) -> AdapterFile:
        """Loads an adapter (evicting the least recently used idle one if the bound is reached).
        Once begun it runs to its end even if the caller gives up.

        Raises:
            InvalidArgument / NotFound: bad name or file; the server is left as it was.
            RateLimited: every loaded adapter is in use; retry after the hint.
        """
        return await self._to_the_end(self._load(name))

    async def ensure_loaded(self, names: Iterable[str]) -> None:
        """Adapters on demand: loads each named adapter that is not loaded but has a file in the
        adapter directory (names without a file, or being unloaded, are left to validation:
        NOT_FOUND). Concurrent
        callers share one load: loads run one at a time and find the adapter loaded.

        On return every such adapter is selectable, with no await since the last check, so a
        caller that holds them at once cannot lose one to an eviction.

        Raises:
            RateLimited: every loaded adapter is in use; retry after the hint.
            InvalidArgument: the file is not a LoRA file the model takes.
        """
        # Only cold names: one being unloaded (an admin's unload, or an eviction under way) stays
        # unavailable until that ends, as before adapters loaded on demand.
        wanted = [
            name
            for name in set(names)
            if name not in self._loaded and self.directory.has_file(name)
        ]
        while missing := [name for name in wanted if name not in self.selectable()]:
            for name in missing:
                await self.load(name)

    async def unload(self, name: str) -> None:
        """Unloads an adapter once the requests holding it have finished. Once begun it runs to
        its end even if the caller gives up.

        Raises:
            NotFound: the adapter is not loaded.
        """
        await self._to_the_end(self._unload(name))

    async def _to_the_end(self, change: Coroutine[Any, Any, T]) -> T:
        """Runs an admin change as its own task. A caller's deadline or disconnect cancels only
        its wait: a change cut short would leave the registry and the engine disagreeing (an
        adapter loaded but unrecorded, or marked unloading forever)."""
        task = asyncio.ensure_future(change)
        self._changes.add(task)  # held until done, and its outcome read if nobody waits
        task.add_done_callback(self._changes.discard)
        task.add_done_callback(lambda done: done.cancelled() or done.exception())
        return await asyncio.shield(task)

    async def _load(self, name: str) -> AdapterFile:
        async with self._admin:
            if name in self._loaded and self._loaded[name].unloading is None:
                return self._loaded[name].file
            file = self.directory.describe(name)
            await self._make_room()
            started = time.perf_counter()
            try:
                parameters = await self._run_on_engine(
                    lambda engine: engine.adapters.load(name, file.path)
                )
            except ValueError as error:
                raise InvalidArgument("name", f"{name!r}: {error}") from error
            self._metrics.adapter_load_time.observe(time.perf_counter() - started)
            self._loaded[name] = _Loaded(file)
            self._metrics.adapter_parameters.set(parameters)
            self._metrics.adapter_loads.inc()
            self._metrics.loaded_adapters.set(len(self._loaded))
            return file

    async def _unload(self, name: str) -> None:
        async with self._admin:
            entry = self._loaded.get(name)
            if entry is None:
                raise NotFound(f"name: adapter {name!r} is not loaded")
            await self._drop(name, entry)

    def adopt(self, files: Iterable[AdapterFile], parameters: int) -> None:
        """Records adapters the engine loaded at start-up."""
        for file in files:
            self._loaded[file.name] = _Loaded(file)
        self._metrics.loaded_adapters.set(len(self._loaded))
        self._metrics.adapter_parameters.set(parameters)

    async def _make_room(self) -> None:
        while len(self._loaded) >= self._max_loaded:
            idle = [name for name, entry in self._loaded.items() if entry.holders == 0]
            if not idle:
                raise RateLimited(
                    f"all {self._max_loaded} loaded adapters are in use; retry shortly",
                    retry_after_s=BUSY_RETRY_S,
                )
            await self._drop(idle[0], self._loaded[idle[0]])  # least recently used first
            self._metrics.adapter_evictions.inc()

    async def _drop(self, name: str, entry: _Loaded) -> None:
        entry.unloading = asyncio.Event()
        if entry.holders == 0:
            entry.unloading.set()
        await entry.unloading.wait()
        parameters = await self._run_on_engine(lambda engine: engine.adapters.unload(name))
        self._metrics.adapter_parameters.set(parameters)
        del self._loaded[name]
        self._metrics.loaded_adapters.set(len(self._loaded))
