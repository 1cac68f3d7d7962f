"""Typed clients for the imagegen API: `ImageGenClient` (blocking) and `AsyncImageGenClient`.

Both retry UNAVAILABLE (queue full, draining replica, connection refused) with exponential
backoff and full jitter within the call's overall timeout, send a bearer token when given, and
can use TLS or mutual TLS. Only grpcio and protobuf are needed.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc

from .types import (
    Adapter,
    GenerationResult,
    OutputFormat,
    ProgressEvent,
    event_from_proto,
)

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024 * 1024
HEALTH_TIMEOUT_S = 5.0  # a health check's deadline when neither the call nor the client sets one
# gRPC refuses deadlines much further out (9e9 s fails at once); longer timeouts are cut to this.
MAX_TIMEOUT_S = 1e8
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 5  # 1 = no retries
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    retryable: frozenset[grpc.StatusCode] = field(
        default_factory=lambda: frozenset({grpc.StatusCode.UNAVAILABLE})
    )

    def backoff_s(self, attempt: int, error: grpc.RpcError | None = None) -> float:
        """Sleep before retry number `attempt` (1-based): full jitter, at least the server's
        `retry-after-ms` hint when it sent one."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return max(random.uniform(0, ceiling), _retry_after_s(error))

    def should_retry(self, error: grpc.RpcError, attempt: int) -> bool:
        return attempt < self.max_attempts and error.code() in self.retryable


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """TLS (server authentication) and, with a client certificate and key, mutual TLS."""

    root_certificates: bytes | None = None  # PEM; None = the system roots
    client_certificate: bytes | None = None  # PEM, for mutual TLS
    client_key: bytes | None = None
    server_name: str | None = None  # overrides the name checked against the server certificate

    def __post_init__(self) -> None:
        # gRPC aborts the whole process when it gets one of the pair without the other.
        if (self.client_certificate is None) != (self.client_key is None):
            raise ValueError("mutual TLS needs both a client certificate and its key")

    @classmethod
    def from_files(
        cls,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        server_name: str | None = None,
    ) -> TlsConfig:
        def read(path: str | Path | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return cls(read(ca), read(cert), read(key), server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.client_key,
            certificate_chain=self.client_certificate,
        )


def build_request(
    prompt: str,
    *,
    negative_prompt: str = "",
    width: int = 0,
    height: int = 0,
    steps: int = 0,
    guidance_scale: float | None = None,
    seed: int | None = None,
    num_images: int = 1,
    output_format: OutputFormat = OutputFormat.PNG,
    output_quality: int = 0,
    adapters: Sequence[Adapter] = (),
    priority: int = 0,
    request_id: str = "",
    preview_every_n_steps: int = 0,
    init_image: bytes | str | Path | None = None,
    strength: float | None = None,
    mask_image: bytes | str | Path | None = None,
) -> pb.GenerateRequest:
    """A GenerateRequest; 0 means "the server's default" for sizes, steps, quality, priority.

    `init_image` (bytes or a file path) turns it into image-to-image with `strength`, and
    `mask_image` (white = regenerate) into inpainting.
    """
    request = pb.GenerateRequest(
        prompt=prompt,
        negative_prompt=negative_prompt,
        width=width,
        height=height,
        num_inference_steps=steps,
        num_images=num_images,
        output_format=int(output_format),  # type: ignore[arg-type]
        output_quality=output_quality,
        priority=priority,
        request_id=request_id,
        preview_every_n_steps=preview_every_n_steps,
        init_image=_image_bytes(init_image),
        mask_image=_image_bytes(mask_image),
    )
    if strength is not None:
        request.strength = strength
    if guidance_scale is not None:
        request.guidance_scale = guidance_scale
    if seed is not None:
        request.seed = seed
    for adapter in adapters:
        request.adapters.add(name=adapter.name, scale=adapter.scale)
    return request


class _ClientBase:
    """Connection settings shared by both clients.

    Args:
        target: `host:port`, or any gRPC target such as `dns:///name:port`.
        tls: True for TLS with the system roots, a TlsConfig for custom roots or mutual TLS.
        token: bearer token sent as `authorization` metadata.
        timeout_s: default overall deadline of a call, retries included; None = none.
        retry: which statuses are retried and how long to wait (default: UNAVAILABLE, 5 tries).
        max_message_bytes: largest message either way (images can be large).
        load_balancing_policy: e.g. "round_robin" across the addresses a DNS name resolves to.
        options: further gRPC channel options.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        tls: TlsConfig | bool | None = None,
        token: str | None = None,
        timeout_s: float | None = None,
        retry: RetryPolicy | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        load_balancing_policy: str | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        tls_config = TlsConfig() if tls is True else (tls or None)
        channel_options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            *options,
        ]
        if load_balancing_policy:
            config: dict[str, Any] = {"loadBalancingConfig": [{load_balancing_policy: {}}]}
            channel_options.append(("grpc.service_config", json.dumps(config)))
        if tls_config is not None and tls_config.server_name:
            channel_options.append(("grpc.ssl_target_name_override", tls_config.server_name))
        credentials = tls_config.credentials() if tls_config is not None else None
        self._connect(target, credentials, channel_options)

    def _connect(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None,
        options: list[tuple[str, Any]],
    ) -> None:
        """Opens the channel and its stubs (blocking or asyncio, by subclass)."""
        raise NotImplementedError

    def _deadline(self, timeout_s: float | None) -> float | None:
        timeout = self._timeout(timeout_s)
        return None if timeout is None else time.monotonic() + timeout

    def _timeout(self, timeout_s: float | None) -> float | None:
        """The call's timeout, else the client's: infinity means none, and the longest is
        MAX_TIMEOUT_S."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        if timeout is None or timeout == math.inf:
            return None
        if math.isnan(timeout):
            raise ValueError("timeout_s must be a number of seconds or None, not NaN")
        return min(timeout, MAX_TIMEOUT_S)

    def _health_timeout(self, timeout_s: float | None) -> float:
        timeout = self._timeout(timeout_s)
        return HEALTH_TIMEOUT_S if timeout is None else timeout

    @staticmethod
    def _remaining(deadline: float | None) -> float | None:
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def _retry_wait(
        self, error: grpc.RpcError, attempt: int, deadline: float | None
    ) -> float | None:
        """Seconds to wait before retrying after `error`, or None to give up: not retryable, no
        attempts left, or a wait that would outlast the call's deadline (the caller then gets
        the server's status, not a DEADLINE_EXCEEDED of the client's own making)."""
        if not self.retry.should_retry(error, attempt):
            return None
        wait = self.retry.backoff_s(attempt, error)
        remaining = self._remaining(deadline)
        return None if remaining is not None and wait >= remaining else wait


class ImageGenClient(_ClientBase):
    """Blocking client (arguments: see _ClientBase). Use as a context manager, or `close()`."""

    def _connect(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None,
        options: list[tuple[str, Any]],
    ) -> None:
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._stub = pb_grpc.ImageGenerationStub(self._channel)
        self._admin = pb_grpc.AdapterAdminStub(self._channel)

    def __enter__(self) -> ImageGenClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(
        self, prompt: str, *, timeout_s: float | None = None, **options: Any
    ) -> GenerationResult:
        """Generates images; the keyword options are those of `build_request`.

        Raises:
            grpc.RpcError: the final status (INVALID_ARGUMENT names the field at fault).
        """
        request = build_request(prompt, **options)
        return self._with_retries(
            lambda t: GenerationResult.from_proto(
                self._stub.Generate(request, timeout=t, metadata=self._metadata)
            ),
            timeout_s,
        )

    def stream(
        self, prompt: str, *, timeout_s: float | None = None, **options: Any
    ) -> Iterator[ProgressEvent]:
        """Yields queued / started / step / completed events. Retries UNAVAILABLE only before the
        first event arrived, so nothing is seen twice."""
        request = build_request(prompt, **options)
        deadline = self._deadline(timeout_s)
        attempt = 0
        while True:
            attempt += 1
            call = self._stub.StreamProgress(
                request, timeout=self._remaining(deadline), metadata=self._metadata
            )
            received = False
            try:
                for message in call:
                    received = True
                    yield event_from_proto(message)
                return
            except grpc.RpcError as error:
                wait = None if received else self._retry_wait(error, attempt, deadline)
                if wait is None:
                    raise
                time.sleep(wait)
            finally:
                call.cancel()  # type: ignore[no-untyped-call]

    def server_info(self, *, timeout_s: float | None = None) -> pb.ServerInfo:
        return self._with_retries(
            lambda t: self._stub.GetServerInfo(
                pb.GetServerInfoRequest(), timeout=t, metadata=self._metadata
            ),
            timeout_s,
        )

    def health(self, service: str = "", *, timeout_s: float | None = None) -> str:
        """The grpc.health.v1 status name (SERVING, NOT_SERVING, ...), within `timeout_s`, else
        the client's timeout, else HEALTH_TIMEOUT_S. Needs grpcio-health-checking (the `cli`
        extra)."""
        health_pb2, health_pb2_grpc = _health_modules()
        stub = health_pb2_grpc.HealthStub(self._channel)
        response = stub.Check(
            health_pb2.HealthCheckRequest(service=service),
            timeout=self._health_timeout(timeout_s),
            metadata=self._metadata,
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def load_adapter(self, name: str, *, timeout_s: float | None = None) -> pb.AdapterInfo:
        return self._with_retries(
            lambda t: self._admin.LoadAdapter(
                pb.LoadAdapterRequest(name=name), timeout=t, metadata=self._metadata
            ),
            timeout_s,
        )

    def unload_adapter(self, name: str, *, timeout_s: float | None = None) -> None:
        self._with_retries(
            lambda t: self._admin.UnloadAdapter(
                pb.UnloadAdapterRequest(name=name), timeout=t, metadata=self._metadata
            ),
            timeout_s,
        )

    def list_adapters(self, *, timeout_s: float | None = None) -> list[pb.AdapterInfo]:
        response = self._with_retries(
            lambda t: self._admin.ListAdapters(
                pb.ListAdaptersRequest(), timeout=t, metadata=self._metadata
            ),
            timeout_s,
        )
        return list(response.adapters)

    def _with_retries(self, call: Callable[[float | None], T], timeout_s: float | None) -> T:
        deadline = self._deadline(timeout_s)
        attempt = 0
        while True:
            attempt += 1
            try:
                return call(self._remaining(deadline))
            except grpc.RpcError as error:
                wait = self._retry_wait(error, attempt, deadline)
                if wait is None:
                    raise
                time.sleep(wait)


class AsyncImageGenClient(_ClientBase):
    """asyncio client with the same methods as ImageGenClient, awaitable."""

    def _connect(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None,
        options: list[tuple[str, Any]],
    ) -> None:
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        self._stub = pb_grpc.ImageGenerationStub(self._channel)
        self._admin = pb_grpc.AdapterAdminStub(self._channel)

    async def __aenter__(self) -> AsyncImageGenClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(grace=None)

    async def generate(
        self, prompt: str, *, timeout_s: float | None = None, **options: Any
    ) -> GenerationResult:
        request = build_request(prompt, **options)

        async def call(timeout: float | None) -> GenerationResult:
            response = await self._stub.Generate(request, timeout=timeout, metadata=self._metadata)
            return GenerationResult.from_proto(response)

        return await self._with_retries(call, timeout_s)

    async def stream(
        self, prompt: str, *, timeout_s: float | None = None, **options: Any
    ) -> AsyncIterator[ProgressEvent]:
        request = build_request(prompt, **options)
        deadline = self._deadline(timeout_s)
        attempt = 0
        while True:
            attempt += 1
            call = self._stub.StreamProgress(
                request, timeout=self._remaining(deadline), metadata=self._metadata
            )
            received = False
            try:
                async for message in call:
                    received = True
                    yield event_from_proto(message)
                return
            except grpc.RpcError as error:
                wait = None if received else self._retry_wait(error, attempt, deadline)
                if wait is None:
                    raise
                await asyncio.sleep(wait)
            finally:
                call.cancel()

    async def server_info(self, *, timeout_s: float | None = None) -> pb.ServerInfo:
        async def call(timeout: float | None) -> pb.ServerInfo:
            return await self._stub.GetServerInfo(
                pb.GetServerInfoRequest(), timeout=timeout, metadata=self._metadata
            )

        return await self._with_retries(call, timeout_s)

    async def health(self, service: str = "", *, timeout_s: float | None = None) -> str:
        health_pb2, health_pb2_grpc = _health_modules()
        stub = health_pb2_grpc.HealthStub(self._channel)
        response = await stub.Check(
            health_pb2.HealthCheckRequest(service=service),
            timeout=self._health_timeout(timeout_s),
            metadata=self._metadata,
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    async def load_adapter(self, name: str, *, timeout_s: float | None = None) -> pb.AdapterInfo:
        async def call(timeout: float | None) -> pb.AdapterInfo:
            request = pb.LoadAdapterRequest(name=name)
            return await self._admin.LoadAdapter(request, timeout=timeout, metadata=self._metadata)

        return await self._with_retries(call, timeout_s)

    async def unload_adapter(self, name: str, *, timeout_s: float | None = None) -> None:
        async def call(timeout: float | None) -> None:
            request = pb.UnloadAdapterRequest(name=name)
            await self._admin.UnloadAdapter(request, timeout=timeout, metadata=self._metadata)

        await self._with_retries(call, timeout_s)

    async def list_adapters(self, *, timeout_s: float | None = None) -> list[pb.AdapterInfo]:
        async def call(timeout: float | None) -> list[pb.AdapterInfo]:
            response = await self._admin.ListAdapters(
                pb.ListAdaptersRequest(), timeout=timeout, metadata=self._metadata
            )
            return list(response.adapters)

        return await self._with_retries(call, timeout_s)

    async def _with_retries(
        self, call: Callable[[float | None], Awaitable[T]], timeout_s: float | None
    ) -> T:
        deadline = self._deadline(timeout_s)
        attempt = 0
        while True:
            attempt += 1
            try:
                return await call(self._remaining(deadline))
            except grpc.RpcError as error:
                wait = self._retry_wait(error, attempt, deadline)
                if wait is None:
                    raise
                await asyncio.sleep(wait)


def _image_bytes(source: bytes | str | Path | None) -> bytes:
    if source is None:
        return b""
    return source if isinstance(source, bytes) else Path(source).read_bytes()


def _retry_after_s(error: grpc.RpcError | None) -> float:
    """The server's `retry-after-ms` trailer (sent with RESOURCE_EXHAUSTED), in seconds."""
    trailers: Any = getattr(error, "trailing_metadata", lambda: None)()
    for key, value in trailers or ():
        if key == "retry-after-ms":
            try:
                return int(value) / 1000
            except ValueError:
                return 0.0
    return 0.0


def _health_modules() -> tuple[Any, Any]:
    """grpc.health.v1's messages and stubs; the base install has no grpcio-health-checking."""
    try:
        from grpc_health.v1 import health_pb2, health_pb2_grpc
    except ImportError as error:
        raise ImportError(
            "health checks need grpcio-health-checking: pip install 'imagegen-serve[cli]'"
        ) from error
    return health_pb2, health_pb2_grpc
