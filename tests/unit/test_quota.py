"""Quotas in cost units on their own: the rule with a fake clock, the memory and SQLite stores
(Redis, which needs a socket, is tested for real in tests/integration/test_quota_redis.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from imagegen_server.api.policy import Quota, Tenant
from imagegen_server.api.quota import MemoryStore, QuotaStore
from imagegen_server.api.quota_stores import SqliteStore
from imagegen_server.base.cost import request_cost
from imagegen_server.base.errors import PermissionDenied, RateLimited
from support import engine_params
from support_quota import HOUR, REFUND_CHECKS, Clock, admitted, book


def test_cost_is_pixels_times_steps_doubled_by_guidance() -> None:
    small = engine_params("s", steps=4)  # 64x64, one image
    assert request_cost(small) == pytest.approx(64 * 64 * 4 / 1e6)
    large = engine_params("l", num_images=4, steps=16)
    object.__setattr__(large, "guidance_scale", 4.0)
    assert request_cost(large) == pytest.approx(request_cost(small) * 4 * 4 * 2)


def test_an_edits_references_add_their_encoded_pixels_to_every_image() -> None:
    from imagegen_server.base.references import ReferenceImages
    from PIL import Image

    pictures = (Image.new("RGB", (640, 480)), Image.new("RGB", (480, 480)))
    references = ReferenceImages(pictures, digest="d")
    edit = engine_params("e", num_images=2, steps=4)
    object.__setattr__(edit, "references", references)
    encoded = sum(width * height for width, height in references.vae_sizes)
    assert encoded > 1_500_000  # two references at about one megapixel each
    assert request_cost(edit) == pytest.approx((64 * 64 + encoded) * 2 * 4 / 1e6)


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


@pytest.mark.parametrize("check", REFUND_CHECKS, ids=lambda check: check.__name__)
@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_refunds(kind: str, check: Callable[[QuotaStore], None], tmp_path: Path) -> None:
    check(MemoryStore() if kind == "memory" else SqliteStore(tmp_path / "q.db"))
