"""Quotas in cost units on their own: the rule with a fake clock, each store, and Redis for real."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from imagegen_server.api.policy import Quota, Tenant
from imagegen_server.api.quota import MemoryStore, QuotaBook, QuotaStore
from imagegen_server.api.quota_stores import RedisStore, SqliteStore
from imagegen_server.base.cost import request_cost
from imagegen_server.base.errors import EngineUnavailable, PermissionDenied, RateLimited
from support import engine_params
from support_redis import RedisServer

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


def test_cost_is_pixels_times_steps_doubled_by_guidance() -> None:
    small = engine_params("s", steps=4)  # 64x64, one image
    assert request_cost(small) == pytest.approx(64 * 64 * 4 / 1e6)
    large = engine_params("l", num_images=4, steps=16)
    object.__setattr__(large, "guidance_scale", 4.0)
    assert request_cost(large) == pytest.approx(request_cost(small) * 4 * 4 * 2)


def test_large_requests_are_limited_sooner_by_the_cost_ratio() -> None:
    quota = Quota(rate_per_s=1.0, burst=100.0)
    clock = Clock()
    quotas = book(MemoryStore(), clock)
    assert admitted(quotas, Tenant("small", quota=quota), cost=1.0) == 100
    assert admitted(quotas, Tenant("large", quota=quota), cost=25.0) == 4  # 100 / 25


def test_the_bucket_refills_at_its_rate_and_says_when() -> None:
    clock = Clock()
    quotas = book(MemoryStore(), clock)
    tenant = Tenant("t", quota=Quota(rate_per_s=2.0, burst=10.0))
    assert admitted(quotas, tenant, cost=5.0) == 2
    with pytest.raises(RateLimited) as refused:
        asyncio.run(quotas.charge(tenant, 5.0))
    assert refused.value.retry_after_s == pytest.approx(2.5)  # 5 units at 2 per second
    clock.now += 2.5
    assert admitted(quotas, tenant, cost=5.0) == 1


def test_a_request_above_the_burst_passes_on_a_full_bucket_and_leaves_debt() -> None:
    clock = Clock()
    quotas = book(MemoryStore(), clock)
    tenant = Tenant("t", quota=Quota(rate_per_s=1.0, burst=10.0))
    asyncio.run(quotas.charge(tenant, 30.0))
    with pytest.raises(RateLimited) as refused:
        asyncio.run(quotas.charge(tenant, 1.0))
    assert refused.value.retry_after_s == pytest.approx(21.0)  # from -20 back to 1


def test_the_hourly_quota_refills_when_its_window_rolls_over() -> None:
    clock = Clock()
    quotas = book(MemoryStore(), clock)
    tenant = Tenant("t", quota=Quota(per_hour=100.0, per_day=250.0))
    clock.now += 600  # ten minutes into the hour
    assert admitted(quotas, tenant, cost=10.0) == 10
    with pytest.raises(RateLimited) as refused:
        asyncio.run(quotas.charge(tenant, 10.0))
    assert refused.value.retry_after_s == pytest.approx(HOUR - 600)
    clock.now += HOUR - 600
    assert admitted(quotas, tenant, cost=10.0) == 10
    clock.now += HOUR
    assert admitted(quotas, tenant, cost=10.0) == 5  # the day's 250 is spent


def test_a_request_larger_than_a_whole_window_is_refused_outright() -> None:
    quotas = book(MemoryStore(), Clock())
    with pytest.raises(PermissionDenied, match="per_hour quota"):
        asyncio.run(quotas.charge(Tenant("t", quota=Quota(per_hour=10.0)), 11.0))


def test_tenants_without_limits_are_not_charged() -> None:
    quotas = book(MemoryStore(), Clock())
    for _ in range(1000):
        asyncio.run(quotas.charge(Tenant("free"), 1e6))


def test_sqlite_state_survives_reopening_the_file(tmp_path: Path) -> None:
    clock = Clock()
    tenant = Tenant("t", quota=Quota(rate_per_s=0.01, burst=50.0, per_day=1000.0))
    assert admitted(book(SqliteStore(tmp_path / "q.db"), clock), tenant, cost=10.0) == 5
    reopened = book(SqliteStore(tmp_path / "q.db"), clock)  # as after a restart
    with pytest.raises(RateLimited):
        asyncio.run(reopened.charge(tenant, 10.0))


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    server.stop()


def test_redis_two_books_spend_one_budget(redis_server: RedisServer) -> None:
    clock = Clock()
    tenant = Tenant("shared", quota=Quota(rate_per_s=0.001, burst=40.0, per_hour=1000.0))
    first = book(RedisStore(redis_server.url), clock)
    second = book(RedisStore(redis_server.url), clock)
    for _ in range(2):
        asyncio.run(first.charge(tenant, 10.0))
        asyncio.run(second.charge(tenant, 10.0))
    with pytest.raises(RateLimited) as refused:
        asyncio.run(second.charge(tenant, 10.0))
    assert refused.value.retry_after_s == pytest.approx(10.0 / 0.001)


def test_redis_windows_match_the_memory_rule(redis_server: RedisServer) -> None:
    tenant = Tenant("t", quota=Quota(per_hour=100.0, per_day=250.0))
    for store in (MemoryStore(), RedisStore(redis_server.url)):
        clock = Clock()
        quotas = book(store, clock)
        clock.now += 600
        assert admitted(quotas, tenant, cost=10.0) == 10
        clock.now += HOUR
        assert admitted(quotas, tenant, cost=10.0) == 10
        clock.now += HOUR
        assert admitted(quotas, tenant, cost=10.0) == 5


@pytest.mark.parametrize("failure", ["open", "closed"])
def test_an_unreachable_redis_fails_as_configured(tmp_path: Path, failure: str) -> None:
    quotas = book(RedisStore(f"unix://{tmp_path}/nobody.sock"), Clock(), failure)
    tenant = Tenant("t", quota=Quota(per_hour=1.0))
    if failure == "open":
        asyncio.run(quotas.charge(tenant, 1.0))
        asyncio.run(quotas.charge(tenant, 1.0))  # nothing counted: still admitted
    else:
        with pytest.raises(EngineUnavailable, match="quota store is unreachable"):
            asyncio.run(quotas.charge(tenant, 1.0))
