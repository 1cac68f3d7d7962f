"""Typed Python client for imagegen-serve (needs only grpcio and protobuf)."""

from .client import (
    AsyncImageGenClient,
    ImageGenClient,
    RetryPolicy,
    TlsConfig,
    build_request,
)
from .types import (
    Adapter,
    Completed,
    GeneratedImage,
    GenerationResult,
    OutputFormat,
    Preview,
    ProgressEvent,
    Queued,
    Started,
    Step,
    Timings,
)

__all__ = [
    "Adapter",
    "AsyncImageGenClient",
    "Completed",
    "GeneratedImage",
    "GenerationResult",
    "ImageGenClient",
    "OutputFormat",
    "Preview",
    "ProgressEvent",
    "Queued",
    "RetryPolicy",
    "Started",
    "Step",
    "Timings",
    "TlsConfig",
    "build_request",
]
