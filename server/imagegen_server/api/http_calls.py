"""The life of an HTTP image request beyond its route: what the edge keeps for it, as the gRPC
interceptor does for a call (its access-log line, its trace span with the parent from the
`traceparent` header, its count in the per-tenant metrics), and the watch for a client that
leaves (its work is then dropped, as a cancelled gRPC call's). A streamed answer outlives its
handler, so a call is opened by the handler and closed by whoever sends the last byte: the
handler for a JSON body, the event stream else.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..base.metrics import Metrics
from . import access_log
from .access_log import CURRENT_RECORD, MAX_LOGGED_ID_CHARS, AccessRecord
from .auth import current_tenant
from .tracing import RequestSpan, Tracing

T = TypeVar("T")


class ClientGone(Exception):
    """The HTTP client closed its connection before the answer was ready."""


@dataclass(slots=True)
class HttpCall:
    """One image request's record and span; `close` once, with its final status."""

    record: AccessRecord
    span: RequestSpan
    closed: bool = False

    @classmethod
    def open(cls, rpc: str, headers: Mapping[str, str], tracing: Tracing) -> HttpCall:
        """Opens the record (current for the servicer to fill in) and starts the span."""
        record = AccessRecord(rpc, protocol="http")
        record.request_id = headers.get("x-request-id", "")[:MAX_LOGGED_ID_CHARS]
        CURRENT_RECORD.set(record)
        return cls(record, tracing.start_request_span(rpc, headers.items()))

    def close(self, metrics: Metrics, rpc: str, code: str, message: str = "") -> None:
        """Writes the access line and counts the request for its tenant (the caller the guard
        identified), as `rpc` (StreamProgress once the body asked for a stream)."""
        if self.closed:
            return
        self.closed = True
        self.record.method = rpc
        access_log.write(self.record, code, message)
        metrics.tenant_requests.labels(tenant=current_tenant(), code=code).inc()
        self.span.end(rpc)


class EventStream(StreamingResponse):
    """Server-sent events whose work stops when the client goes: the stream and a watch for the
    disconnect race, whatever ASGI version the server speaks. `on_end` runs once it is over."""

    def __init__(self, *args: Any, on_end: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_end = on_end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            with contextlib.suppress(ClientGone, ClientDisconnect, OSError):
                await until_disconnected(receive, self.stream_response(send))
        finally:
            self._on_end()


async def until_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Runs `work` until it ends or the client disconnects (then it is cancelled: a request's
    work is dropped as when a gRPC call is cancelled). Call it once the body has been read.

    Raises:
        ClientGone: the client left first.
    """
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(receive))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the server cancels the handler (a stop): so does the work
        task.cancel()
        raise
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ClientGone
    return task.result()


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
