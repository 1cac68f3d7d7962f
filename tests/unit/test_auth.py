"""Tokens, roles and the rate limiter on their own (fake clock)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from imagegen_server.api.auth import Guard, RateLimiter, Role, TokenAuthenticator
from imagegen_server.base.errors import PermissionDenied, RateLimited, Unauthenticated

CLIENT_TOKEN = "c" * 20
ADMIN_TOKEN = "a" * 24


def tokens_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tokens"
    path.write_text(text)
    return path


def test_token_file_roles_comments_and_blank_lines(tmp_path: Path) -> None:
    authenticator = TokenAuthenticator.from_file(
        tokens_file(tmp_path, f"# team tokens\n\nclient:{CLIENT_TOKEN}\n admin : {ADMIN_TOKEN} \n")
    )
    assert authenticator.role_of(CLIENT_TOKEN) is Role.CLIENT
    assert authenticator.role_of(ADMIN_TOKEN) is Role.ADMIN
    assert authenticator.role_of("x" * 20) is None


@pytest.mark.parametrize(
    "text,message",
    [
        ("superuser:" + "s" * 20, "expected `client:TOKEN`"),
        ("just-a-token-without-role", "expected `client:TOKEN`"),
        ("client:short", "at least 16 characters"),
        ("admin:REPLACE-ME-with-a-real-admin-token", "placeholder"),
        ("# only comments\n", "no tokens"),
    ],
)
def test_bad_token_files_are_refused_with_the_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TokenAuthenticator.from_file(tokens_file(tmp_path, text))


def test_only_digests_are_kept(tmp_path: Path) -> None:
    authenticator = TokenAuthenticator.from_file(tokens_file(tmp_path, f"client:{CLIENT_TOKEN}"))
    assert CLIENT_TOKEN.encode() not in repr(vars(authenticator)).encode()


def guard(limiter: RateLimiter | None = None) -> Guard:
    authenticator = TokenAuthenticator(
        [
            (hashlib.sha256(CLIENT_TOKEN.encode()).digest(), Role.CLIENT),
            (hashlib.sha256(ADMIN_TOKEN.encode()).digest(), Role.ADMIN),
        ]
    )
    return Guard(
        authenticator,
        lambda method: (
            Role.ADMIN if "Admin" in method else (None if "Health" in method else Role.CLIENT)
        ),
        limiter,
        lambda method: method.endswith("/Generate"),
    )


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def test_roles_are_enforced_and_health_is_open() -> None:
    checks = guard()
    with pytest.raises(Unauthenticated):
        checks.check("/imagegen.v1.ImageGeneration/Generate", [], "ipv4:10.0.0.1:5000")
    with pytest.raises(Unauthenticated):
        checks.check(
            "/imagegen.v1.ImageGeneration/Generate", bearer("w" * 20), "ipv4:10.0.0.1:5000"
        )
    with pytest.raises(PermissionDenied, match="LoadAdapter needs the admin role"):
        checks.check(
            "/imagegen.v1.AdapterAdmin/LoadAdapter", bearer(CLIENT_TOKEN), "ipv4:10.0.0.1:5000"
        )
    assert (
        checks.check("/imagegen.v1.AdapterAdmin/LoadAdapter", bearer(ADMIN_TOKEN), "p").role
        is Role.ADMIN
    )
    assert (
        checks.check("/imagegen.v1.ImageGeneration/Generate", bearer(ADMIN_TOKEN), "p").role
        is Role.ADMIN
    )
    assert checks.check("/grpc.health.v1.Health/Check", [], "p").role is None


def test_token_bucket_burst_refill_and_retry_hint() -> None:
    now = [0.0]
    limiter = RateLimiter(rate_per_s=2.0, burst=3, max_clients=10, clock=lambda: now[0])
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(0.5)  # one token takes 1/2 s to refill
    assert limiter.acquire("b") == 0.0  # buckets are per client
    now[0] = 0.5
    assert limiter.acquire("a") == 0.0
    now[0] = 100.0
    assert [limiter.acquire("a") for _ in range(4)][-1] > 0  # refills only up to the burst


def test_client_buckets_are_bounded() -> None:
    limiter = RateLimiter(rate_per_s=1.0, burst=1, max_clients=2, clock=lambda: 0.0)
    for client in ("a", "b", "c"):
        limiter.acquire(client)
    assert len(limiter._buckets) == 2
    assert limiter.acquire("a") == 0.0  # forgotten, so full again (bounded state over fairness)


def test_rate_limited_by_token_identity_not_by_connection() -> None:
    now = [0.0]
    checks = guard(RateLimiter(rate_per_s=1.0, burst=1, max_clients=10, clock=lambda: now[0]))
    method = "/imagegen.v1.ImageGeneration/Generate"
    checks.check(method, bearer(CLIENT_TOKEN), "ipv4:10.0.0.1:1111")
    with pytest.raises(RateLimited) as limited:
        checks.check(method, bearer(CLIENT_TOKEN), "ipv4:10.0.0.2:2222")  # same token, other peer
    assert limited.value.retry_after_s == pytest.approx(1.0)
    checks.check(method, bearer(ADMIN_TOKEN), "ipv4:10.0.0.1:1111")  # another identity
    checks.check(
        "/imagegen.v1.ImageGeneration/GetServerInfo", bearer(CLIENT_TOKEN), "p"
    )  # not limited
