"""Helpers for the quota tests (unit and Redis): a fake clock and counting admissions."""

from __future__ import annotations

import asyncio

from imagegen_server.api.policy import Tenant
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
