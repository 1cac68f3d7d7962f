"""Per-tenant limits in cost units: a token bucket (rate and burst) and windowed quotas (per
clock hour, per UTC day), kept in a store: this process, an SQLite file or Redis.

A request is charged its cost (megapixel-steps, base/cost.py) when it is admitted, all limits
at once or none: if any limit lacks room, nothing is spent and the caller gets
RESOURCE_EXHAUSTED with `retry-after-ms`, the time until every limit has room again (the bucket
refilled enough, the window rolled over). A request costing more than the bucket's capacity
passes when the bucket is full and leaves it in debt, so large requests are slowed, not
refused; one costing more than a whole window's quota is refused with PERMISSION_DENIED, since
no wait would let it through.

Times are wall-clock seconds (time.time()): windows are aligned to UTC hours and days so that
every replica sharing a store agrees on them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from ..base.errors import EngineUnavailable, PermissionDenied, RateLimited
from ..base.metrics import Metrics
from .policy import Quota, Tenant

log = logging.getLogger(__name__)

FailureMode = Literal["open", "closed"]


class StoreUnavailable(Exception):
    """The store could not be reached or answered in time."""


class QuotaStore(Protocol):
    def spend(self, tenant: str, cost: float, quota: Quota, now: float) -> float:
        """Spends `cost` if every limit has room and returns 0; else spends nothing and
        returns the seconds until every limit has room.

        Raises:
            StoreUnavailable: the store could not answer.
        """
        ...


@dataclass(frozen=True, slots=True)
class Decision:
    wait_s: float  # 0 = allowed
    tokens: float  # the bucket after the decision (spent only when allowed)


def decide(
    quota: Quota, cost: float, now: float, bucket: tuple[float, float] | None, spent: list[float]
) -> Decision:
    """The one rule, for stores that read state and write it back in a transaction.

    Args:
        bucket: (tokens, updated) as stored, or None for a full bucket.
        spent: what each of `quota.windows()` has spent in its current window.
    """
    tokens = quota.burst
    wait_s = 0.0
    if quota.rate_per_s > 0:
        if bucket is not None:
            stored, updated = bucket
            tokens = min(quota.burst, stored + max(0.0, now - updated) * quota.rate_per_s)
        need = min(cost, quota.burst)
        if tokens < need:
            wait_s = (need - tokens) / quota.rate_per_s
    for (_, length, limit), used in zip(quota.windows(), spent, strict=True):
        if used + cost > limit:
            wait_s = max(wait_s, window_end(now, length) - now)
    return Decision(wait_s, tokens if wait_s > 0 else tokens - cost)


def window_index(now: float, length: float) -> int:
    return math.floor(now / length)


def window_end(now: float, length: float) -> float:
    return (window_index(now, length) + 1) * length


class MemoryStore:
    """This process only: the default. Bounded by the tenants of the tokens file."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> tokens, updated
        self._windows: dict[tuple[str, str], tuple[int, float]] = {}  # -> index, spent

    def spend(self, tenant: str, cost: float, quota: Quota, now: float) -> float:
        windows = quota.windows()
        spent = [
            self._spent(tenant, name, window_index(now, length)) for name, length, _ in windows
        ]
        decision = decide(quota, cost, now, self._buckets.get(tenant), spent)
        if decision.wait_s > 0:
            return decision.wait_s
        if quota.rate_per_s > 0:
            self._buckets[tenant] = (decision.tokens, now)
        for (name, length, _), used in zip(windows, spent, strict=True):
            self._windows[(tenant, name)] = (window_index(now, length), used + cost)
        return 0.0

    def _spent(self, tenant: str, window: str, index: int) -> float:
        stored_index, spent = self._windows.get((tenant, window), (index, 0.0))
        return spent if stored_index == index else 0.0


class QuotaBook:
    """Charges requests to their tenants' quotas; runs on the event loop, the store's I/O in a
    worker thread (SQLite and Redis block)."""

    def __init__(
        self,
        store: QuotaStore,
        failure: FailureMode,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        blocking: bool = True,
    ) -> None:
        self._store = store
        self._failure = failure  # what an unreachable store means: let requests through or not
        self._metrics = metrics
        self._clock = clock
        self._blocking = blocking  # the store does I/O: call it off the event loop

    async def charge(self, tenant: Tenant, cost: float) -> None:
        """Spends `cost` from `tenant`'s quota.

        Raises:
            RateLimited: a limit lacks room (RESOURCE_EXHAUSTED, retry-after-ms).
            PermissionDenied: the request costs more than a whole window's quota.
            EngineUnavailable: the store is unreachable and the failure mode is closed.
        """
        quota = tenant.quota
        if not quota.limited:
            return
        for name, _, limit in quota.windows():
            if cost > limit:
                raise PermissionDenied(
                    f"cost: this request costs {cost:g} megapixel-steps, more than tenant"
                    f" {tenant.name}'s per_{name} quota of {limit:g}; make it smaller"
                )
        wait_s = await self._spend(tenant, cost)
        if wait_s > 0:
            raise RateLimited(
                f"tenant {tenant.name}'s quota is spent (this request costs {cost:g}"
                f" megapixel-steps); retry in {wait_s:.1f}s",
                retry_after_s=wait_s,
            )

    async def _spend(self, tenant: Tenant, cost: float) -> float:
        now = self._clock()
        try:
            if self._blocking:
                return await asyncio.to_thread(
                    self._store.spend, tenant.name, cost, tenant.quota, now
                )
            return self._store.spend(tenant.name, cost, tenant.quota, now)
        except StoreUnavailable as error:
            if self._metrics is not None:
                self._metrics.quota_store_errors.inc()
            if self._failure == "open":
                log.warning("quota store unreachable, failing open: %s", error)
                return 0.0
            raise EngineUnavailable(
                "the quota store is unreachable; retry shortly (quota_store_failure=closed)"
            ) from error
