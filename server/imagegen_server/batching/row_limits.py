"""Per-key limits on the rows of one step, below `max_batch_size`: pure Python, no clock.

Two limits stack: what fits on the device (the memory probe, known before a key's first step),
and below that an out-of-memory back-off, which a step that ran out of memory sets and which
recovers over time, doubling, up to what fits (never above it: the probe measured that).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import TypeVar

from ..base.errors import InvalidArgument

log = logging.getLogger(__name__)

Key = TypeVar("Key", bound=Hashable)


class RowLimits:
    def __init__(self, max_batch_size: int, recovery_s: float) -> None:
        self._max_batch_size = max_batch_size
        self._recovery_s = recovery_s  # after out-of-memory: when to try twice the rows again
        self._fitting: dict[Hashable, int] = {}  # the memory probe's answer, per key
        self._backoffs: dict[Hashable, tuple[int, float]] = {}  # (rows, since when), per key
        self._probed: set[Hashable] = set()  # keys the memory probe was asked about

    def cap(self, key: Hashable, rows: int) -> None:
        """Caps the rows per step of `key` at what fits on the device, below max_batch_size.

        Called at a key's first request, before any step of it.
        """
        self._fitting[key] = max(1, min(rows, self._max_batch_size))

    def probe_once(self, key: Key, probe: Callable[[Key], int | None]) -> None:
        """At a key's first request: caps it at what `probe` (the memory probe) says fits."""
        if key in self._probed:
            return
        self._probed.add(key)
        rows = probe(key)
        if rows is not None:
            self.cap(key, rows)

    def check_fits(self, key: Hashable, images: int, size: str) -> None:
        """A request's images step together, so more than fit on the device would run out of
        memory at every step.

        Raises:
            InvalidArgument: `images` of `size` (WxH) do not fit in one step of `key`.
        """
        fitting = self.fitting(key)
        if images > fitting:
            raise InvalidArgument(
                "num_images",
                f"{images} outside [1, {fitting}]: at most {fitting} images of {size} fit in "
                "one step on this device",
            )

    def fitting(self, key: Hashable) -> int:
        """The most rows per step of `key` the device holds (max_batch_size if not capped)."""
        return self._fitting.get(key, self._max_batch_size)

    def current(self, key: Hashable) -> int:
        """What fits on the device, or the out-of-memory back-off below it."""
        backoff = self._backoffs.get(key)
        return self.fitting(key) if backoff is None else backoff[0]

    def after_step(self, key: Hashable, out_of_memory_rows: int | None, now: float) -> None:
        """After every step: backs `key` off if the step ran out of memory (`out_of_memory_rows`
        did fit), and lets the back-offs old enough recover."""
        if out_of_memory_rows is not None:
            log.warning("out of memory at %s: capping it at %d rows", key, out_of_memory_rows)
            self.back_off(key, out_of_memory_rows, now)
        self.recover(now)

    def back_off(self, key: Hashable, rows_that_fit: int, now: float) -> None:
        """A step of `key` ran out of memory; `rows_that_fit` rows did not. Caps the key there
        until `recover` finds the back-off old enough to try twice as many."""
        self._backoffs[key] = (max(1, min(rows_that_fit, self.fitting(key))), now)

    def recover(self, now: float) -> None:
        """Doubles each back-off old enough, up to what fits on the device, where it ends."""
        for key, (rows, since) in list(self._backoffs.items()):
            if now - since < self._recovery_s:
                continue
            if rows * 2 >= self.fitting(key):
                del self._backoffs[key]
            else:
                self._backoffs[key] = (rows * 2, now)
