"""The adapter registry: which adapter files exist, which are loaded, who is using them.

Adapters live as `<name>.safetensors` in one directory. Names are checked (no path separators,
no traversal, no file outside the directory). At most `max_loaded` are loaded; loading one more
evicts the least recently used adapter that no queued or running request holds. Requests hold
their adapters from acceptance to their last status, so an adapter in use is never evicted, and
an unload waits for its holders to finish. All methods run on the event loop; the weights
themselves are loaded and dropped on the engine thread, through `run_on_engine`.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from safetensors import safe_open

from .errors import InvalidArgument, NotFound, RateLimited
from .metrics import Metrics
from .types import AdapterSpec

T = TypeVar("T")

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SUFFIX = ".safetensors"
# An eviction cannot free room while every loaded adapter is in use: the caller retries later.
BUSY_RETRY_S = 1.0


@dataclass(frozen=True, slots=True)
class AdapterFile:
    name: str
    path: Path
    format: str  # "kohya" or "peft"
    rank: int
    parameters: int
    size_bytes: int


@dataclass(slots=True)
class _Loaded:
    file: AdapterFile
    holders: int = 0  # queued or running requests that named it
    unloading: asyncio.Event | None = None  # set once the last holder is gone
    last_used: float = field(default_factory=time.monotonic)


class AdapterDirectory:
    """The files an adapter name may refer to."""

    def __init__(self, directory: Path | None) -> None:
        self._directory = directory.resolve() if directory is not None else None

    def resolve(self, name: str) -> Path:
        """The file for `name`.

        Raises:
            InvalidArgument: the name is malformed or points outside the directory.
            NotFound: no such adapter file (or no adapter directory configured).
        """
        if not NAME_PATTERN.fullmatch(name) or name.endswith(SUFFIX):
            raise InvalidArgument(
                "name", f"{name!r} is not an adapter name (1-64 of [A-Za-z0-9._-], no extension)"
            )
        if self._directory is None:
            raise NotFound(f"name: no adapter directory is configured; {name!r} cannot be loaded")
        path = (self._directory / f"{name}{SUFFIX}").resolve()
        if path.parent != self._directory:  # a symlink leading out of the directory
            raise InvalidArgument("name", f"{name!r} resolves outside the adapter directory")
        if not path.is_file():
            raise NotFound(f"name: no adapter {name!r} in the adapter directory")
        return path

    def describe(self, name: str) -> AdapterFile:
        """Reads only the file's header: format, rank and size, without loading weights.

        Raises:
            InvalidArgument: the file is not a safetensors LoRA file.
        """
        path = self.resolve(name)
        try:
            with safe_open(str(path), framework="pt") as handle:
                keys = list(handle.keys())
                downs = [
                    key for key in keys if key.endswith((".lora_down.weight", ".lora_A.weight"))
                ]
                rank = handle.get_slice(downs[0]).get_shape()[0] if downs else 0
                parameters = sum(_numel(handle.get_slice(key).get_shape()) for key in keys)
        except Exception as error:
            raise InvalidArgument(
                "name", f"{name!r} is not a readable safetensors file: {error}"
            ) from error
        if not downs:
            raise InvalidArgument("name", f"{name!r} has no lora_down/lora_A weights")
        kohya = any(key.endswith(".lora_down.weight") for key in keys)
        return AdapterFile(
            name, path, "kohya" if kohya else "peft", rank, parameters, path.stat().st_size
        )

    def names(self) -> list[str]:
        if self._directory is None or not self._directory.is_dir():
            return []
        return sorted(
            path.name.removesuffix(SUFFIX)
            for path in self._directory.glob(f"*{SUFFIX}")
            if NAME_PATTERN.fullmatch(path.name.removesuffix(SUFFIX))
        )


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
            try:
                parameters = await self._run_on_engine(
                    lambda engine: engine.adapters.load(name, file.path)
                )
            except ValueError as error:
                raise InvalidArgument("name", f"{name!r}: {error}") from error
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


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
