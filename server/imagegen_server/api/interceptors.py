"""Server interceptors: the one place typed errors become gRPC statuses and RPCs are counted."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError

from ..base.errors import ImageGenError, InvalidArgument
from ..base.metrics import Metrics
from . import access_log
from .access_log import CURRENT_RECORD, MAX_LOGGED_ID_CHARS, AccessRecord
from .auth import CURRENT_CALLER, Guard, current_tenant
from .tracing import Tracing

log = logging.getLogger(__name__)

API_PREFIX = "/imagegen.v1."
ACCESS_LOGGED = ("Generate", "StreamProgress")  # the RPCs that get an access-log line
if TYPE_CHECKING:  # generic only in grpc-stubs, not at run time
    Context = grpc.aio.ServicerContext[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]


class _MalformedRequest:
    """Stands in for a request whose bytes did not parse, so the handler can answer
    INVALID_ARGUMENT instead of gRPC's generic INTERNAL for deserialization failures."""

    def __init__(self, error: DecodeError) -> None:
        self.error = error


class StatusInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Checks each call with the guard (token, role, rate), maps ImageGenError to its status and
    anything else to INTERNAL with a safe message (details go to the log), and counts every RPC
    of the imagegen API by method and final status."""

    def __init__(
        self, metrics: Metrics, guard: Guard | None = None, tracing: Tracing | None = None
    ) -> None:
        self._metrics = metrics
        self._guard = guard
        self._tracing = tracing or Tracing(None)  # spans of generation calls; off by default

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        api = method.startswith(API_PREFIX)
        if handler is None or not (api or (self._guard and self._guard.needs_check(method))):
            return handler  # health and reflection, open by configuration
        deserializer = (
            _tolerant(handler.request_deserializer) if api else handler.request_deserializer
        )
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:  # StreamProgress, health's Watch
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(method, handler.unary_stream),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:  # server reflection
            return grpc.stream_stream_rpc_method_handler(
                self._streaming(method, handler.stream_stream),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _streaming(self, method: str, behavior: Callable[..., Any]) -> Any:
        """A streaming handler yields its messages (an async generator) or writes them with
        `context.write` (a coroutine, as health's Watch does); the wrapper keeps its kind, which
        is how grpc.aio tells the two apart."""
        if inspect.isasyncgenfunction(behavior):
            return self._stream(method, behavior)
        return self._unary(method, behavior)

    def _unary(
        self, method: str, behavior: Callable[..., Awaitable[Any]]
    ) -> Callable[..., Awaitable[Any]]:
        async def handle(request: Any, context: Context) -> Any:
            async with self._accounted(method, request, context):
                return await behavior(request, context)

        return handle

    def _stream(
        self, method: str, behavior: Callable[..., AsyncIterator[Any]]
    ) -> Callable[..., AsyncIterator[Any]]:
        async def handle(request: Any, context: Context) -> AsyncIterator[Any]:
            async with self._accounted(method, request, context):
                async for message in behavior(request, context):
                    yield message

        return handle

    @contextlib.asynccontextmanager
    async def _accounted(self, method: str, request: Any, context: Context) -> AsyncIterator[None]:
        """For a generation call, opens its access record and its trace span around the rest."""
        started = time.perf_counter()
        record = self._open_record(method)
        traced: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if record is not None:  # the client's id, even when validation then refuses the call
            record.request_id = str(getattr(request, "request_id", ""))[:MAX_LOGGED_ID_CHARS]
            traced = self._tracing.request_span(record.method, context.invocation_metadata() or ())
        with traced:
            async with self._guarded(method, request, context, record, started):
                yield

    @contextlib.asynccontextmanager
    async def _guarded(
        self,
        method: str,
        request: Any,
        context: Context,
        record: AccessRecord | None,
        started: float,
    ) -> AsyncIterator[None]:
        """Guards the call, maps errors raised inside to statuses and, for the imagegen API,
        counts the RPC with its final status and writes its access line."""
        try:
            _reject_malformed(request)
            if self._guard is not None:
                caller = self._guard.check(
                    method, context.invocation_metadata() or (), context.peer()
                )
                CURRENT_CALLER.set(caller)
                if record is not None:
                    record.note_policy(caller.policy)
            yield
        except BaseException as error:
            # Counted before the abort sends the status: a client that reads the metrics after
            # its call ended must find the call counted.
            code = _status_of(error, context)
            self._count(method, code, started)
            if record is not None:
                access_log.write(record, code.name, _message_of(error, context))
            await _abort_if_ours(error, context)
            raise
        self._count(method, grpc.StatusCode.OK, started)
        if record is not None:
            access_log.write(record, grpc.StatusCode.OK.name)

    def _open_record(self, method: str) -> AccessRecord | None:
        """The access-log record of a generation call (the servicer fills it in)."""
        rpc = method.rsplit("/", 1)[-1]
        if not method.startswith(API_PREFIX) or rpc not in ACCESS_LOGGED:
            return None
        record = AccessRecord(rpc)
        CURRENT_RECORD.set(record)
        CURRENT_CALLER.set(None)
        return record

    def _count(self, method: str, code: grpc.StatusCode, started: float) -> None:
        if method.startswith(API_PREFIX):
            rpc = method.rsplit("/", 1)[-1]
            self._metrics.count_request("grpc", rpc, code.name, time.perf_counter() - started)
            if rpc in ACCESS_LOGGED:
                tenant = current_tenant()
                self._metrics.tenant_requests.labels(tenant=tenant, code=code.name).inc()


def _message_of(error: BaseException, context: Context) -> str:
    """The status message the client gets for `error`."""
    if isinstance(error, ImageGenError):
        return error.message
    if isinstance(error, grpc.aio.AbortError):
        return str(context.details() or "")
    return "" if isinstance(error, (asyncio.CancelledError, GeneratorExit)) else "internal error"


def _status_of(error: BaseException, context: Context) -> grpc.StatusCode:
    """The status the client ends up with for `error`."""
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
    if isinstance(error, grpc.aio.AbortError):
        code: grpc.StatusCode = context.code()
        return code
    if isinstance(error, ImageGenError):
        return grpc_status(error)
    return grpc.StatusCode.INTERNAL


async def _abort_if_ours(error: BaseException, context: Context) -> None:
    """Ends the RPC with the mapped status (abort raises); leaves cancellation and aborts be."""
    if isinstance(error, ImageGenError):
        await context.abort(grpc_status(error), error.message, trailing_metadata=_trailers(error))
    if isinstance(error, Exception) and not isinstance(error, grpc.aio.AbortError):
        log.error("unhandled error in RPC", exc_info=error)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")


def grpc_status(error: ImageGenError) -> grpc.StatusCode:
    """The gRPC status of a typed error (its `Status` has the same name)."""
    code: grpc.StatusCode = grpc.StatusCode[error.status.name]
    return code


def _trailers(error: ImageGenError) -> tuple[tuple[str, str], ...]:
    retry_after = getattr(error, "retry_after_s", None)
    return (("retry-after-ms", str(int(retry_after * 1000))),) if retry_after is not None else ()


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as error:
            return _MalformedRequest(error)

    return parse


def _reject_malformed(request: Any) -> None:
    if isinstance(request, _MalformedRequest):
        raise InvalidArgument("request", f"malformed protobuf message ({request.error})")
