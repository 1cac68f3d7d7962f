"""Typed errors raised inside the server; the API edges map each to its status in one place each
(`api.interceptors` for gRPC, `api.http_api` for HTTP), so nothing below the edges imports grpc.

Each error names its gRPC `Status`; `HTTP_STATUS` is the one table from those to HTTP statuses,
so the two protocols always agree on what went wrong."""

from __future__ import annotations

import enum


class Status(enum.Enum):
    """The gRPC status an error ends its request with; names equal `grpc.StatusCode`'s."""

    INVALID_ARGUMENT = enum.auto()
    NOT_FOUND = enum.auto()
    RESOURCE_EXHAUSTED = enum.auto()
    FAILED_PRECONDITION = enum.auto()
    UNAVAILABLE = enum.auto()
    DEADLINE_EXCEEDED = enum.auto()
    CANCELLED = enum.auto()
    UNAUTHENTICATED = enum.auto()
    PERMISSION_DENIED = enum.auto()
    INTERNAL = enum.auto()


# The HTTP status of each gRPC status, as the OpenAI-compatible API answers it. CANCELLED is
# nginx's 499 (the client closed the request): never seen by that client, only in logs.
HTTP_STATUS = {
    Status.INVALID_ARGUMENT: 400,
    Status.UNAUTHENTICATED: 401,
    Status.PERMISSION_DENIED: 403,
    Status.NOT_FOUND: 404,
    Status.FAILED_PRECONDITION: 409,
    Status.RESOURCE_EXHAUSTED: 429,
    Status.CANCELLED: 499,
    Status.INTERNAL: 500,
    Status.UNAVAILABLE: 503,
    Status.DEADLINE_EXCEEDED: 504,
}


class ImageGenError(Exception):
    """Base class: `status` is the gRPC status the client receives, `message` is safe to show."""

    status: Status = Status.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def http_status(self) -> int:
        """The HTTP status of this error (`HTTP_STATUS`, unless the error knows better)."""
        return HTTP_STATUS[self.status]


class InvalidArgument(ImageGenError):
    status = Status.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFound(ImageGenError):
    status = Status.NOT_FOUND

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field  # the request field naming what was not found, when one does


class QueueFull(ImageGenError):
    status = Status.UNAVAILABLE


class Draining(ImageGenError):
    status = Status.UNAVAILABLE


class EngineUnavailable(ImageGenError):
    status = Status.UNAVAILABLE


class Shed(ImageGenError):
    """A queued request evicted to make room for a higher-priority one."""

    status = Status.UNAVAILABLE


class DeadlineExceeded(ImageGenError):
    status = Status.DEADLINE_EXCEEDED


class Cancelled(ImageGenError):
    status = Status.CANCELLED


class RateLimited(ImageGenError):
    status = Status.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTooLarge(ImageGenError):
    """A request body over max_request_bytes: gRPC's RESOURCE_EXHAUSTED, HTTP's 413."""

    status = Status.RESOURCE_EXHAUSTED

    @property
    def http_status(self) -> int:
        return 413


class Unauthenticated(ImageGenError):
    status = Status.UNAUTHENTICATED


class PermissionDenied(ImageGenError):
    status = Status.PERMISSION_DENIED


class FailedPrecondition(ImageGenError):
    status = Status.FAILED_PRECONDITION


class InternalError(ImageGenError):
    """The model failed on this request; the details are in the server log, not the message."""

    status = Status.INTERNAL
