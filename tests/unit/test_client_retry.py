"""Client retry policy (which statuses are retried, how long it waits), the one retry loop of
each client (against fake stubs), deadlines, TLS and CLI arguments. No sockets."""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from imagegen.v1 import imagegen_pb2 as pb
from imagegen_client import AsyncImageGenClient, ImageGenClient, RetryPolicy, TlsConfig
from imagegen_client.cli import _adapter, _output_paths, _size, main
from imagegen_client.client import HEALTH_TIMEOUT_S, MAX_TIMEOUT_S
from imagegen_client.types import Queued, event_from_proto


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


def test_the_wait_is_none_when_not_retryable_out_of_attempts_or_past_the_deadline() -> None:
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.01)
    unavailable = FakeError(grpc.StatusCode.UNAVAILABLE)
    assert 0 <= policy.wait_s(unavailable, 1, remaining_s=None) <= 0.01  # type: ignore[operator]
    assert 0 <= policy.wait_s(unavailable, 2, remaining_s=10.0) <= 0.01  # type: ignore[operator]
    assert policy.wait_s(unavailable, 3, remaining_s=None) is None
    assert policy.wait_s(FakeError(grpc.StatusCode.INTERNAL), 1, remaining_s=None) is None
    # A hint longer than what is left of the deadline: the server's status, not a client timeout.
    limited = FakeError(grpc.StatusCode.RESOURCE_EXHAUSTED, (("retry-after-ms", "3000"),))
    patient = RetryPolicy(retryable=frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED}))
    assert patient.wait_s(limited, 1, remaining_s=2.0) is None
    assert patient.wait_s(limited, 1, remaining_s=4.0) == pytest.approx(3.0)


class FailThen:
    """A fake unary stub method: raises `failures` in turn, then returns `response`."""

    def __init__(self, failures: list[FakeError], response: Any, asynchronous: bool) -> None:
        self.failures, self.response, self.asynchronous = list(failures), response, asynchronous
        self.timeouts: list[float | None] = []

    def __call__(self, request: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        self.timeouts.append(timeout)
        failure = self.failures.pop(0) if self.failures else None
        if not self.asynchronous:
            if failure:
                raise failure
            return self.response

        async def respond() -> Any:
            if failure:
                raise failure
            return self.response

        return respond()


def record_sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Replaces both sleeps (blocking and asyncio) with a recorder."""
    slept: list[float] = []

    async def asleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr("imagegen_client.client.time.sleep", slept.append)
    monkeypatch.setattr("imagegen_client.client.asyncio.sleep", asleep)
    return slept


@pytest.mark.parametrize("asynchronous", [False, True], ids=["blocking", "asyncio"])
def test_both_clients_retry_unavailable_within_the_deadline_with_the_same_policy(
    monkeypatch: pytest.MonkeyPatch, asynchronous: bool
) -> None:
    slept = record_sleeps(monkeypatch)
    unavailable = FakeError(grpc.StatusCode.UNAVAILABLE)
    rpc = FailThen([unavailable, unavailable], pb.ServerInfo(model="m"), asynchronous)
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.01)
    info = call_server_info(rpc, policy, asynchronous, timeout_s=30)
    assert info.model == "m" and len(slept) == 2 and all(0 <= s <= 0.02 for s in slept)
    assert len(rpc.timeouts) == 3 and all(0 < t <= 30 for t in rpc.timeouts)  # type: ignore[operator]
    # One attempt fewer: the last status reaches the caller, after the same waits.
    rpc = FailThen([unavailable, unavailable], pb.ServerInfo(), asynchronous)
    with pytest.raises(FakeError):
        call_server_info(rpc, RetryPolicy(max_attempts=2), asynchronous, timeout_s=None)
    assert rpc.timeouts == [None, None] and len(slept) == 3


def call_server_info(rpc: FailThen, policy: RetryPolicy, asynchronous: bool, **kw: Any) -> Any:
    if not asynchronous:
        with ImageGenClient("127.0.0.1:1", retry=policy) as client:
            client._stub = argparse.Namespace(GetServerInfo=rpc)  # type: ignore[assignment]
            return client.server_info(**kw)

    async def call() -> Any:
        async with AsyncImageGenClient("127.0.0.1:1", retry=policy) as client:
            client._stub = argparse.Namespace(GetServerInfo=rpc)  # type: ignore[assignment]
            return await client.server_info(**kw)

    return asyncio.run(call())


class FakeStream:
    """A fake StreamProgress call: yields `events`, then raises `error` if given."""

    def __init__(self, events: int, error: FakeError | None) -> None:
        self.events, self.error, self.cancelled = events, error, False

    def _messages(self) -> list[pb.ProgressEvent]:
        return [
            pb.ProgressEvent(request_id="r", queued=pb.Queued(position=i))
            for i in range(self.events)
        ]

    def __iter__(self) -> Iterator[pb.ProgressEvent]:
        yield from self._messages()
        if self.error:
            raise self.error

    async def _aiter(self) -> AsyncIterator[pb.ProgressEvent]:
        for message in self._messages():
            yield message
        if self.error:
            raise self.error

    def __aiter__(self) -> AsyncIterator[pb.ProgressEvent]:
        return self._aiter()

    def cancel(self) -> None:
        self.cancelled = True


@pytest.mark.parametrize("asynchronous", [False, True], ids=["blocking", "asyncio"])
def test_a_stream_is_retried_only_until_its_first_event(
    monkeypatch: pytest.MonkeyPatch, asynchronous: bool
) -> None:
    slept = record_sleeps(monkeypatch)
    unavailable = FakeError(grpc.StatusCode.UNAVAILABLE)
    # Refused before any event: retried; then two events and the stream breaks: not retried.
    calls = [FakeStream(0, unavailable), FakeStream(2, unavailable), FakeStream(3, None)]
    opened = iter(calls)
    stub = argparse.Namespace(StreamProgress=lambda request, **kw: next(opened))
    events: list[Any] = []
    with pytest.raises(FakeError):
        collect_stream(stub, asynchronous, events)
    assert [e.position for e in events] == [0, 1] and all(isinstance(e, Queued) for e in events)
    assert len(slept) == 1 and calls[1].cancelled and not calls[2].cancelled


def collect_stream(stub: Any, asynchronous: bool, events: list[Any]) -> None:
    if not asynchronous:
        with ImageGenClient("127.0.0.1:1") as client:
            client._stub = stub
            events.extend(client.stream("x"))
        return

    async def collect() -> None:
        async with AsyncImageGenClient("127.0.0.1:1") as client:
            client._stub = stub
            async for event in client.stream("x"):
                events.append(event)

    asyncio.run(collect())


def test_cli_argument_parsing() -> None:
    assert _size("1024x768") == (1024, 768)
    assert _adapter("ink:0.5").name == "ink" and _adapter("ink:0.5").scale == 0.5
    assert _adapter("ink").scale == 1.0
    assert _output_paths(Path("out.png"), 2) == [Path("out-0.png"), Path("out-1.png")]


def test_a_client_key_pair_must_be_whole() -> None:
    """gRPC aborts the process (not an exception) when given half of the pair."""
    with pytest.raises(ValueError, match="both a client certificate and its key"):
        TlsConfig(client_certificate=b"cert")
    with pytest.raises(ValueError, match="both a client certificate and its key"):
        TlsConfig(client_key=b"key")


def test_timeouts_infinite_means_none_huge_is_capped_and_health_has_a_default() -> None:
    with ImageGenClient("127.0.0.1:1", timeout_s=math.inf) as client:
        assert client._timeout(None) is None  # gRPC would fail such a deadline at once
        assert client._timeout(1e12) == MAX_TIMEOUT_S
        assert client._health_timeout(None) == HEALTH_TIMEOUT_S
        with pytest.raises(ValueError, match="NaN"):
            client._timeout(math.nan)
    with ImageGenClient("127.0.0.1:1", timeout_s=1.5) as client:
        assert client._health_timeout(None) == 1.5  # the client's timeout, as every call
        assert client._health_timeout(0.25) == 0.25


def test_health_without_the_cli_extra_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "grpc_health.v1", None)  # as if not installed
    assert main(["--target", "127.0.0.1:1", "health"]) == 2
    assert "pip install 'imagegen-serve[cli]'" in capsys.readouterr().err


def test_a_preview_keeps_the_media_type_the_server_sent() -> None:
    message = pb.ProgressEvent(request_id="r", step=pb.Step(step=1, total_steps=4))
    message.step.previews.add(image_index=0, data=b"x", mime_type="image/webp", width=8, height=8)
    (preview,) = event_from_proto(message).previews  # type: ignore[union-attr]
    assert (preview.mime_type, preview.width, preview.data) == ("image/webp", 8, b"x")
