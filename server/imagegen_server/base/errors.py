"""Typed errors raised inside the server; the API edge maps each to one gRPC status in one place
(`api.interceptors`), so nothing below the edge imports grpc."""

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


class ImageGenError(Exception):
    """Base class: `status` is the gRPC status the client receives, `message` is safe to show."""

    status: Status = Status.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ImageGenError):
    status = Status.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFound(ImageGenError):
    status = Status.NOT_FOUND


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


class Unauthenticated(ImageGenError):
    status = Status.UNAUTHENTICATED


class PermissionDenied(ImageGenError):
    status = Status.PERMISSION_DENIED


class FailedPrecondition(ImageGenError):
    status = Status.FAILED_PRECONDITION


class InternalError(ImageGenError):
    """The model failed on this request; the details are in the server log, not the message."""

    status = Status.INTERNAL
