"""A fleet of two real server processes drawing on one tenant's budget in a real Redis; the
tokens file reloaded by SIGHUP; access lines in JSON on stderr."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from imagegen_client import ImageGenClient, RetryPolicy
from support_redis import RedisServer

from .conftest import ServerProcess, launch

NO_RETRY = RetryPolicy(max_attempts=1)
TOKEN = "fleet-token-0123456789"
ROTATED = "rotated-token-0123456789"
COST_64 = 64 * 64 * 4 / 1e6  # one 64x64 image, 4 steps
RELOAD_TIMEOUT_S = 30.0


def tokens_text(token: str) -> str:
    return (
        f"tenants:\n  acme: {{per_day: {COST_64 * 3}}}\n"
        f"tokens:\n  - {{name: fleet, token: {token}, role: client, tenant: acme}}\n"
    )


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    server.stop()


def wait_for_log(server: ServerProcess, text: str) -> None:
    """Polls the process's stderr lines (a signal's effect has no other outward sign)."""
    deadline = time.monotonic() + RELOAD_TIMEOUT_S
    while not any(text in line for line in list(server.log)):
        assert time.monotonic() < deadline, f"no {text!r} in:\n{server.log_tail()}"
        time.sleep(0.05)


def test_two_servers_on_one_redis_spend_one_budget(
    tiny_model: Path, tmp_path: Path, redis_server: RedisServer
) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(tokens_text(TOKEN))
    flags = (
        "--auth-tokens-file", str(tokens),
        "--auth-tokens-poll-s", "0",
        "--quota-store", redis_server.url,
        "--quota-store-failure", "closed",
        "--log-format", "json",
    )  # fmt: skip
    with launch(tiny_model, *flags) as first, launch(tiny_model, *flags) as second:
        first.wait_serving()
        second.wait_serving()
        client_of = {
            server: server_client(server, TOKEN) for server in (first, second)
        }  # fmt: skip
        client_of[first].generate("one", request_id="fleet-1")
        client_of[first].generate("two")
        client_of[second].generate("three")  # the day's 3 units are spent, across the fleet
        for server in (first, second):
            with pytest.raises(grpc.RpcError) as refused:
                client_of[server].generate("four")
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert int(dict(refused.value.trailing_metadata())["retry-after-ms"]) > 0

        tokens.write_text(tokens_text(ROTATED))
        first.process.send_signal(signal.SIGHUP)
        wait_for_log(first, "tokens file reloaded")
        with pytest.raises(grpc.RpcError) as unknown:
            server_client(first, TOKEN).generate("old token")
        assert unknown.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as still_spent:  # same tenant, same spent budget
            server_client(first, ROTATED).generate("new token")
        assert still_spent.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        access = [json.loads(line) for line in list(first.log) if '"event": "access"' in line]
    served = [line for line in access if line["request_id"] == "fleet-1"]
    assert len(served) == 1 and served[0]["status"] == "OK" and served[0]["tenant"] == "acme"
    assert "prompt" not in served[0]
    statuses = sorted(line["status"] for line in access)
    assert statuses == ["OK", "OK", "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED"]


def server_client(server: ServerProcess, token: str) -> ImageGenClient:
    return ImageGenClient(server.target, token=token, retry=NO_RETRY)
