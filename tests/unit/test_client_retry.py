"""Client retry policy (which statuses are retried, how long it waits), deadlines, TLS and CLI
arguments: what is decided before any call."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import grpc
import pytest
from imagegen.v1 import imagegen_pb2 as pb
from imagegen_client import ImageGenClient, RetryPolicy, TlsConfig
from imagegen_client.cli import _adapter, _output_paths, _size, main
from imagegen_client.client import HEALTH_TIMEOUT_S, MAX_TIMEOUT_S
from imagegen_client.types import event_from_proto


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
