"""Typed Python client for imagegen-serve (needs only grpcio and protobuf)."""

from .client import AsyncImageGenClient, ImageGenClient, TlsConfig
from .request import build_request
from .retry import RetryPolicy
from .types import (
    Adapter,
    AdapterInfo,
    BatchingInfo,
    Completed,
    GeneratedImage,
    GenerationResult,
    Limits,
    OutputFormat,
    Preview,
    ProgressEvent,
    Queued,
    ResolutionBatchLimit,
    ServerInfo,
    Started,
    Step,
    Timings,
)

__all__ = [
    "Adapter",
    "AdapterInfo",
    "AsyncImageGenClient",
    "BatchingInfo",
    "Completed",
    "GeneratedImage",
    "GenerationResult",
    "ImageGenClient",
    "Limits",
    "OutputFormat",
    "Preview",
    "ProgressEvent",
    "Queued",
    "ResolutionBatchLimit",
    "RetryPolicy",
    "ServerInfo",
    "Started",
    "Step",
    "Timings",
    "TlsConfig",
    "build_request",
]
