"""Typed errors raised inside the server; the service maps each to one gRPC status in one place."""

from __future__ import annotations

import grpc


class ImageGenError(Exception):
    """Base class: `code` is the gRPC status the client receives, `message` is safe to show."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ImageGenError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFound(ImageGenError):
    code = grpc.StatusCode.NOT_FOUND


class QueueFull(ImageGenError):
    code = grpc.StatusCode.UNAVAILABLE


class Draining(ImageGenError):
    code = grpc.StatusCode.UNAVAILABLE


class EngineUnavailable(ImageGenError):
    code = grpc.StatusCode.UNAVAILABLE


class Shed(ImageGenError):
    """A queued request evicted to make room for a higher-priority one."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ImageGenError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ImageGenError):
    code = grpc.StatusCode.CANCELLED


class RateLimited(ImageGenError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unauthenticated(ImageGenError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ImageGenError):
    code = grpc.StatusCode.PERMISSION_DENIED


class FailedPrecondition(ImageGenError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class InternalError(ImageGenError):
    """The model failed on this request; the details are in the server log, not the message."""

    code = grpc.StatusCode.INTERNAL
