"""Typed clients for the imagegen API: `ImageGenClient` (blocking) and `AsyncImageGenClient`.

Both retry UNAVAILABLE (queue full, draining replica, connection refused) with exponential
backoff and full jitter within the call's overall timeout, send a bearer token when given, and
can use TLS or mutual TLS. Every call returns the dataclasses of `types`, never protobuf. Only
grpcio and protobuf are needed.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc

from .request import build_request, cancel_request
from .retry import RetryPolicy
from .types import (
    AdapterInfo,
    GenerationResult,
    ProgressEvent,
    ServerInfo,
    event_from_proto,
)

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024 * 1024
HEALTH_TIMEOUT_S = 5.0  # a health check's deadline when neither the call nor the client sets one
# gRPC refuses deadlines much further out (9e9 s fails at once); longer timeouts are cut to this.
MAX_TIMEOUT_S = 1e8
T = TypeVar("T")
Request = TypeVar("Request")
Response = TypeVar("Response")


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

    def _health_check(self, channel: Any, service: str, timeout_s: float | None) -> Any:
        """Starts a grpc.health.v1 check on `channel` (not retried): the response, or its
        awaitable on an asyncio channel."""
        health_pb2, health_pb2_grpc = _health_modules()
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service),
            timeout=self._health_timeout(timeout_s),
            metadata=self._metadata,
        )


class ImageGenClient(_ClientBase):
    """Blocking client (arguments: see _ClientBase). Use as a context manager, or `close()`."""

    def _connect(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None,
        options: list[tuple[str, Any]],
    ) -> None:
        self._channel: grpc.Channel = _open_channel(grpc, target, credentials, options)
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
        return self._unary(self._stub.Generate, request, GenerationResult.from_proto, timeout_s)

    def edit_with_references(
        self,
        instruction: str,
        reference_images: Sequence[bytes | str | Path],
        *,
        timeout_s: float | None = None,
        **options: Any,
    ) -> GenerationResult:
        """An instruction edit ("put the cat from picture 1 on the sofa from picture 2") of
        `reference_images` (bytes or file paths) on a Qwen-Image-Edit(-Plus) server; the other
        keyword options are those of `build_request`. Not SDEdit: that is `init_image`.

        Raises:
            grpc.RpcError: INVALID_ARGUMENT naming reference_images when the server's model
                takes fewer (or none).
        """
        return self.generate(
            instruction, reference_images=reference_images, timeout_s=timeout_s, **options
        )

    def stream(
        self, prompt: str, *, timeout_s: float | None = None, **options: Any
    ) -> Iterator[ProgressEvent]:
        """Yields queued / started / step / completed events. Retries only until the first event
        arrived, so nothing is seen twice."""
        request = build_request(prompt, **options)

        def start(
            timeout: float | None,
        ) -> tuple[grpc.CallIterator[pb.ProgressEvent], Iterator[pb.ProgressEvent]]:
            call = self._stub.StreamProgress(request, timeout=timeout, metadata=self._metadata)
            messages = iter(call)
            first = next(messages, None)
            return call, itertools.chain([] if first is None else [first], messages)

        call, messages = self._with_retries(start, timeout_s)
        try:
            for message in messages:
                yield event_from_proto(message)
        finally:
            call.cancel()  # type: ignore[no-untyped-call]

    def cancel(
        self,
        *,
        idempotency_key: str = "",
        request_id: str = "",
        timeout_s: float | None = None,
    ) -> str:
        """Cancels a queued or running request of this caller (an admin: of any caller), from
        any connection; its own call ends with CANCELLED. Returns where it was: "queued" or
        "running".

        Raises:
            grpc.RpcError: NOT_FOUND (no such request in flight), PERMISSION_DENIED (another
                caller's), FAILED_PRECONDITION (it already finished).
        """
        request = cancel_request(idempotency_key, request_id)
        return self._unary(self._stub.CancelGeneration, request, _state, timeout_s)

    def server_info(self, *, timeout_s: float | None = None) -> ServerInfo:
        """The model, its request limits, the batching policy and the loaded adapters."""
        request = pb.GetServerInfoRequest()
        return self._unary(self._stub.GetServerInfo, request, ServerInfo.from_proto, timeout_s)

    def health(self, service: str = "", *, timeout_s: float | None = None) -> str:
        """The grpc.health.v1 status name (SERVING, NOT_SERVING, ...), within `timeout_s`, else
        the client's timeout, else HEALTH_TIMEOUT_S. Needs grpcio-health-checking (the `cli`
        extra)."""
        return _status_name(self._health_check(self._channel, service, timeout_s))

    def load_adapter(self, name: str, *, timeout_s: float | None = None) -> AdapterInfo:
        """Loads `<name>.safetensors` from the server's adapter directory (admin role)."""
        request = pb.LoadAdapterRequest(name=name)
        return self._unary(self._admin.LoadAdapter, request, AdapterInfo.from_proto, timeout_s)

    def unload_adapter(self, name: str, *, timeout_s: float | None = None) -> None:
        """Unloads an adapter once the requests holding it finished (admin role)."""
        request = pb.UnloadAdapterRequest(name=name)
        self._unary(self._admin.UnloadAdapter, request, _nothing, timeout_s)

    def list_adapters(self, *, timeout_s: float | None = None) -> list[AdapterInfo]:
        """Every adapter in the server's adapter directory, loaded or not (admin role)."""
        request = pb.ListAdaptersRequest()
        return self._unary(self._admin.ListAdapters, request, _adapter_list, timeout_s)

    def _unary(
        self,
        rpc: grpc.UnaryUnaryMultiCallable[Request, Response],
        request: Request,
        convert: Callable[[Response], T],
        timeout_s: float | None,
    ) -> T:
        return self._with_retries(
            lambda timeout: convert(rpc(request, timeout=timeout, metadata=self._metadata)),
            timeout_s,
        )

    def _with_retries(self, attempt: Callable[[float | None], T], timeout_s: float | None) -> T:
        """Runs `attempt(timeout)` until it succeeds or `self.retry` gives up (see RetryPolicy)."""
        deadline = self._deadline(timeout_s)
        attempts = 0
        while True:
            attempts += 1
            try:
                return attempt(_remaining(deadline))
            except grpc.RpcError as error:
                wait = self.retry.wait_s(error, attempts, _remaining(deadline))
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
        self._channel: grpc.aio.Channel = _open_channel(grpc.aio, target, credentials, options)
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
        return await self._unary(
            self._stub.Generate, request, GenerationResult.from_proto, timeout_s
        )

    async def edit_with_references(
        self,
        instruction: str,
        reference_images: Sequence[bytes | str | Path],
        *,
        timeout_s: float | None = None,
        **options: Any,
    ) -> GenerationResult:
        return await self.generate(
            instruction, reference_images=reference_images, timeout_s=timeout_s, **options
        )

    async def stream(
        self, prompt: str, *, timeout_s: float | None = None, **options: Any
    ) -> AsyncIterator[ProgressEvent]:
        request = build_request(prompt, **options)

        async def start(
            timeout: float | None,
        ) -> tuple[grpc.aio.UnaryStreamCall[Any, Any], AsyncIterator[pb.ProgressEvent]]:
            call = self._stub.StreamProgress(request, timeout=timeout, metadata=self._metadata)
            messages = aiter(call)
            return call, _prepend(await anext(messages, None), messages)

        call, messages = await self._with_retries(start, timeout_s)
        try:
            async for message in messages:
                yield event_from_proto(message)
        finally:
            call.cancel()

    async def cancel(
        self,
        *,
        idempotency_key: str = "",
        request_id: str = "",
        timeout_s: float | None = None,
    ) -> str:
        request = cancel_request(idempotency_key, request_id)
        return await self._unary(self._stub.CancelGeneration, request, _state, timeout_s)

    async def server_info(self, *, timeout_s: float | None = None) -> ServerInfo:
        request = pb.GetServerInfoRequest()
        return await self._unary(
            self._stub.GetServerInfo, request, ServerInfo.from_proto, timeout_s
        )

    async def health(self, service: str = "", *, timeout_s: float | None = None) -> str:
        return _status_name(await self._health_check(self._channel, service, timeout_s))

    async def load_adapter(self, name: str, *, timeout_s: float | None = None) -> AdapterInfo:
        request = pb.LoadAdapterRequest(name=name)
        return await self._unary(
            self._admin.LoadAdapter, request, AdapterInfo.from_proto, timeout_s
        )

    async def unload_adapter(self, name: str, *, timeout_s: float | None = None) -> None:
        request = pb.UnloadAdapterRequest(name=name)
        await self._unary(self._admin.UnloadAdapter, request, _nothing, timeout_s)

    async def list_adapters(self, *, timeout_s: float | None = None) -> list[AdapterInfo]:
        request = pb.ListAdaptersRequest()
        return await self._unary(self._admin.ListAdapters, request, _adapter_list, timeout_s)

    async def _unary(
        self,
        rpc: grpc.aio.UnaryUnaryMultiCallable[Request, Response],
        request: Request,
        convert: Callable[[Response], T],
        timeout_s: float | None,
    ) -> T:
        async def attempt(timeout: float | None) -> T:
            return convert(await rpc(request, timeout=timeout, metadata=self._metadata))

        return await self._with_retries(attempt, timeout_s)

    async def _with_retries(
        self, attempt: Callable[[float | None], Awaitable[T]], timeout_s: float | None
    ) -> T:
        """Awaits `attempt(timeout)` until it succeeds or `self.retry` gives up."""
        deadline = self._deadline(timeout_s)
        attempts = 0
        while True:
            attempts += 1
            try:
                return await attempt(_remaining(deadline))
            except grpc.RpcError as error:
                wait = self.retry.wait_s(error, attempts, _remaining(deadline))
                if wait is None:
                    raise
                await asyncio.sleep(wait)


def _open_channel(
    channels: Any,
    target: str,
    credentials: grpc.ChannelCredentials | None,
    options: list[tuple[str, Any]],
) -> Any:
    """A channel from `channels`, the `grpc` (blocking) or `grpc.aio` module: the two share
    these functions but no type."""
    if credentials is None:
        return channels.insecure_channel(target, options=options)
    return channels.secure_channel(target, credentials, options=options)


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _nothing(response: object) -> None:
    return None


def _state(response: pb.CancelGenerationResponse) -> str:
    return response.state


def _adapter_list(response: pb.ListAdaptersResponse) -> list[AdapterInfo]:
    return [AdapterInfo.from_proto(adapter) for adapter in response.adapters]


async def _prepend(first: T | None, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    """`first` (unless None), then the rest."""
    if first is not None:
        yield first
    async for item in rest:
        yield item


def _status_name(response: Any) -> str:
    health_pb2, _ = _health_modules()
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def _health_modules() -> tuple[Any, Any]:
    """grpc.health.v1's messages and stubs; the base install has no grpcio-health-checking."""
    try:
        from grpc_health.v1 import health_pb2, health_pb2_grpc
    except ImportError as error:
        raise ImportError(
            "health checks need grpcio-health-checking: pip install 'imagegen-serve[cli]'"
        ) from error
    return health_pb2, health_pb2_grpc
