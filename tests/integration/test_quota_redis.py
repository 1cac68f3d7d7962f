"""The Redis quota store against a real `redis-server` on loopback (started by the test): two
quota books spend one budget, windows and refunds follow the memory store's rule, and an
unreachable Redis fails open or closed as configured."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from imagegen_server.api.policy import Quota, Tenant
from imagegen_server.api.quota import MemoryStore, QuotaStore
from imagegen_server.api.quota_stores import RedisStore
from imagegen_server.base.errors import EngineUnavailable, RateLimited
from support_quota import HOUR, REFUND_CHECKS, Clock, admitted, book
from support_redis import RedisServer


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


@pytest.mark.parametrize("check", REFUND_CHECKS, ids=lambda check: check.__name__)
def test_redis_refunds_follow_the_memory_rule(
    redis_server: RedisServer, check: Callable[[QuotaStore], None]
) -> None:
    check(RedisStore(redis_server.url))


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
