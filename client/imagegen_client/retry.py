"""When a failed call is tried again, for both clients: `RetryPolicy`."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import grpc


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Which failed calls are tried again and after how long; the one place that decides it.

    `wait_s` is the whole decision; each client has one thin loop that asks it after every
    failed attempt and sleeps (`time.sleep` or `asyncio.sleep`). A stream's attempt is opening
    it and reading its first event, so a stream is retried only until an event arrived and
    nothing is seen twice.

    Why not gRPC's own service-config retry policy (gRFC A6): it would change what callers get.
    It honours only a `grpc-retry-pushback-ms` trailer, which replaces the backoff, while the
    server sends `retry-after-ms`, which this policy takes as a floor under the backoff; and a
    deadline that passes during its backoff ends the call with DEADLINE_EXCEEDED, while this
    policy does not start a wait that would outlast the deadline and returns the server's own
    status (queue full, rate limited) instead.
    """

    max_attempts: int = 5  # 1 = no retries
    initial_backoff_s: float = 0.1  # the first wait is uniform in [0, this]
    max_backoff_s: float = 5.0  # the most a jittered wait can reach (a server hint may exceed it)
    multiplier: float = 2.0  # the ceiling's growth per retry
    retryable: frozenset[grpc.StatusCode] = field(  # UNAVAILABLE: queue full, draining, no server
        default_factory=lambda: frozenset({grpc.StatusCode.UNAVAILABLE})
    )

    def backoff_s(self, attempt: int, error: grpc.RpcError | None = None) -> float:
        """Sleep before retry number `attempt` (1-based): full jitter, at least the server's
        `retry-after-ms` hint when it sent one."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return max(random.uniform(0, ceiling), retry_after_s(error))

    def should_retry(self, error: grpc.RpcError, attempt: int) -> bool:
        return attempt < self.max_attempts and error.code() in self.retryable

    def wait_s(self, error: grpc.RpcError, attempt: int, remaining_s: float | None) -> float | None:
        """Seconds to wait before the attempt after `attempt` (1-based) failed with `error`.

        Returns:
            None to give up: the status is not retryable, no attempts are left, or the wait
            would outlast the `remaining_s` of the call's deadline (None = no deadline), so that
            the caller gets the server's status, not a DEADLINE_EXCEEDED of the client's making.
        """
        if not self.should_retry(error, attempt):
            return None
        wait = self.backoff_s(attempt, error)
        return None if remaining_s is not None and wait >= remaining_s else wait


def retry_after_s(error: grpc.RpcError | None) -> float:
    """The server's `retry-after-ms` trailer (sent with RESOURCE_EXHAUSTED), in seconds."""
    trailers: Any = getattr(error, "trailing_metadata", lambda: None)()
    for key, value in trailers or ():
        if key == "retry-after-ms":
            try:
                return int(value) / 1000
            except ValueError:
                return 0.0
    return 0.0
