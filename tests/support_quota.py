"""Helpers for the quota tests (unit and Redis): a fake clock, counting admissions, and the
refund rule every store must follow."""

from __future__ import annotations

import asyncio

import pytest
from imagegen_server.api.policy import Quota, Tenant
from imagegen_server.api.quota import QuotaBook, QuotaStore
from imagegen_server.base.errors import RateLimited

HOUR = 3600.0


class Clock:
    def __init__(self, now: float = 1_000_000 * HOUR) -> None:  # on an hour boundary
        self.now = now

    def __call__(self) -> float:
        return self.now


def book(store: QuotaStore, clock: Clock, failure: str = "closed") -> QuotaBook:
    return QuotaBook(store, failure, clock=clock, blocking=False)  # type: ignore[arg-type]


def admitted(quotas: QuotaBook, tenant: Tenant, cost: float) -> int:
    """How many requests of `cost` pass before the first refusal."""
    count = 0
    while True:
        try:
            asyncio.run(quotas.charge(tenant, cost))
        except RateLimited:
            return count
        count += 1


def check_a_refund_gives_room_back(store: QuotaStore) -> None:
    """A refused charge passes once an earlier one is given back (bucket and window)."""
    clock = Clock()
    quotas = book(store, clock)
    tenant = Tenant("t", quota=Quota(rate_per_s=0.001, burst=30.0, per_hour=25.0))
    asyncio.run(quotas.charge(tenant, 10.0))
    second = asyncio.run(quotas.charge(tenant, 10.0))
    assert second is not None
    with pytest.raises(RateLimited):  # the hour: 20 + 10 > 25
        asyncio.run(quotas.charge(tenant, 10.0))
    quotas.refund(second)
    assert asyncio.run(quotas.charge(tenant, 10.0)) is not None


def check_a_refund_never_fills_the_bucket_past_its_burst(store: QuotaStore) -> None:
    clock = Clock()
    quotas = book(store, clock)
    tenant = Tenant("t", quota=Quota(rate_per_s=1.0, burst=30.0))
    charge = asyncio.run(quotas.charge(tenant, 10.0))
    assert charge is not None
    clock.now += 10.0  # refilled to the brim
    quotas.refund(charge)
    assert admitted(quotas, tenant, cost=10.0) == 3  # not 4


def check_a_refund_leaves_a_later_window_alone(store: QuotaStore) -> None:
    """A charge spent in the last hour is not taken off this hour's count."""
    clock = Clock()
    quotas = book(store, clock)
    tenant = Tenant("t", quota=Quota(per_hour=25.0))
    earlier = asyncio.run(quotas.charge(tenant, 20.0))
    assert earlier is not None
    clock.now += HOUR
    asyncio.run(quotas.charge(tenant, 20.0))
    quotas.refund(earlier)
    with pytest.raises(RateLimited):
        asyncio.run(quotas.charge(tenant, 10.0))


REFUND_CHECKS = (
    check_a_refund_gives_room_back,
    check_a_refund_never_fills_the_bucket_past_its_burst,
    check_a_refund_leaves_a_later_window_alone,
)
