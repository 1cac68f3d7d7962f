"""Client retry policy: which statuses are retried, how long it waits."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from imagegen_client import RetryPolicy
from imagegen_client.cli import _adapter, _output_paths, _size


class FakeError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, trailers: tuple[tuple[str, str], ...] = ()) -> None:
        self._code, self._trailers = code, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailers


def test_only_unavailable_is_retried_by_default_and_attempts_are_bounded() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert policy.should_retry(FakeError(grpc.StatusCode.UNAVAILABLE), attempt=1)
    assert policy.should_retry(FakeError(grpc.StatusCode.UNAVAILABLE), attempt=2)
    assert not policy.should_retry(FakeError(grpc.StatusCode.UNAVAILABLE), attempt=3)
    assert not policy.should_retry(FakeError(grpc.StatusCode.INVALID_ARGUMENT), attempt=1)


def test_backoff_grows_exponentially_with_full_jitter_and_a_ceiling() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, multiplier=2.0, max_backoff_s=0.5)
    for attempt, ceiling in ((1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (9, 0.5)):
        samples = [policy.backoff_s(attempt) for _ in range(200)]
        assert min(samples) >= 0 and max(samples) <= ceiling


def test_the_servers_retry_after_hint_is_a_floor() -> None:
    policy = RetryPolicy(initial_backoff_s=0.01)
    error = FakeError(grpc.StatusCode.RESOURCE_EXHAUSTED, (("retry-after-ms", "750"),))
    assert policy.backoff_s(1, error) == pytest.approx(0.75)


def test_cli_argument_parsing() -> None:
    assert _size("1024x768") == (1024, 768)
    assert _adapter("ink:0.5").name == "ink" and _adapter("ink:0.5").scale == 0.5
    assert _adapter("ink").scale == 1.0
    assert _output_paths(Path("out.png"), 2) == [Path("out-0.png"), Path("out-1.png")]
