"""Per-tenant limits in cost units: a token bucket (rate and burst) and windowed quotas (per
clock hour, per UTC day), kept in a store: this process, an SQLite file or Redis.

A request is charged its cost (megapixel-steps, base/cost.py) when it is admitted, all limits
at once or none: if any limit lacks room, nothing is spent and the caller gets
RESOURCE_EXHAUSTED with `retry-after-ms`, the time until every limit has room again (the bucket
refilled enough, the window rolled over). A request costing more than the bucket's capacity
passes when the bucket is full and leaves it in debt, so large requests are slowed, not
refused; one costing more than a whole window's quota is refused with PERMISSION_DENIED, since
no wait would let it through. A charge is given back when its request never ran a step: the
server refused it after the charge (queue full, draining), shed it for a higher priority, or it
was cancelled or timed out while queued. A request that ran at least one step stays charged in
full (the engine did its work; a cancel does not buy it back).

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

    def refund(self, tenant: str, cost: float, quota: Quota, spent_at: float, now: float) -> None:
        """Gives back `cost` spent at `spent_at`: to the bucket (up to its capacity) and to
        the windows it was spent in, if they are still the current ones.

        Raises:
            StoreUnavailable: the store could not answer.
        """
        ...


@dataclass(frozen=True, slots=True)
class Charge:
    """What one admitted request spent, so that it can be given back."""

    tenant: Tenant
    cost: float
    spent_at: float  # wall-clock seconds: which windows it was spent in


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


def refilled(quota: Quota, cost: float, now: float, bucket: tuple[float, float]) -> float:
    """The bucket's tokens after `cost` is given back to `bucket` (tokens, updated) at `now`:
    what it refilled since, plus the cost, never above its capacity."""
    stored, updated = bucket
    return min(quota.burst, stored + max(0.0, now - updated) * quota.rate_per_s + cost)


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

    def refund(self, tenant: str, cost: float, quota: Quota, spent_at: float, now: float) -> None:
        bucket = self._buckets.get(tenant)
        if quota.rate_per_s > 0 and bucket is not None:
            self._buckets[tenant] = (refilled(quota, cost, now, bucket), now)
        for name, length, _ in quota.windows():
            index = window_index(spent_at, length)
            spent = self._spent(tenant, name, index)
            if index == window_index(now, length) and spent > 0:
                self._windows[(tenant, name)] = (index, max(0.0, spent - cost))

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
        self._refunds: set[asyncio.Future[None]] = set()  # given back in worker threads

    async def charge(self, tenant: Tenant, cost: float) -> Charge | None:
        """Spends `cost` from `tenant`'s quota; returns what was spent (None when nothing
        was: the tenant has no limits, or the store is unreachable and failing open).

        Raises:
            RateLimited: a limit lacks room (RESOURCE_EXHAUSTED, retry-after-ms).
            PermissionDenied: the request costs more than a whole window's quota.
            EngineUnavailable: the store is unreachable and the failure mode is closed.
        """
        quota = tenant.quota
        if not quota.limited:
            return None
        for name, _, limit in quota.windows():
            if cost > limit:
                raise PermissionDenied(
                    f"cost: this request costs {cost:g} megapixel-steps, more than tenant"
                    f" {tenant.name}'s per_{name} quota of {limit:g}; make it smaller"
                )
        now = self._clock()
        wait_s = await self._spend(tenant, cost, now)
        if wait_s is None:
            return None
        if wait_s > 0:
            raise RateLimited(
                f"tenant {tenant.name}'s quota is spent (this request costs {cost:g}"
                f" megapixel-steps); retry in {wait_s:.1f}s",
                retry_after_s=wait_s,
            )
        return Charge(tenant, cost, now)

    def refund(self, charge: Charge) -> None:
        """Gives `charge` back (its request never ran a step): at once with the in-process
        store, in a worker thread with one that does I/O (the caller does not wait for it). A
        store that cannot be reached keeps the charge (logged and counted)."""
        if not self._blocking:
            self._give_back(charge)
            return
        task = asyncio.ensure_future(asyncio.to_thread(self._give_back, charge))
        self._refunds.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._refunds.discard)

    async def settled(self) -> None:
        """Waits for the refunds under way: the drain does, so that a store doing I/O has them
        before the process exits."""
        await asyncio.gather(*self._refunds)

    async def _spend(self, tenant: Tenant, cost: float, now: float) -> float | None:
        """The store's answer: 0 spent, > 0 the wait; None = unreachable, failing open."""
        try:
            if self._blocking:
                return await asyncio.to_thread(
                    self._store.spend, tenant.name, cost, tenant.quota, now
                )
            return self._store.spend(tenant.name, cost, tenant.quota, now)
        except StoreUnavailable as error:
            self._store_failed(error)
            if self._failure == "open":
                log.warning("quota store unreachable, failing open: %s", error)
                return None
            raise EngineUnavailable(
                "the quota store is unreachable; retry shortly (quota_store_failure=closed)"
            ) from error

    def _give_back(self, charge: Charge) -> None:
        tenant, now = charge.tenant, self._clock()
        try:
            self._store.refund(tenant.name, charge.cost, tenant.quota, charge.spent_at, now)
        except StoreUnavailable as error:
            self._store_failed(error)
            log.warning("quota store unreachable, tenant %s keeps a charge: %s", tenant.name, error)
            return
        if self._metrics is not None:
            self._metrics.tenant_cost_refunded.labels(tenant=tenant.name).inc(charge.cost)

    def _store_failed(self, error: StoreUnavailable) -> None:
        if self._metrics is not None:
            self._metrics.quota_store_errors.inc()
