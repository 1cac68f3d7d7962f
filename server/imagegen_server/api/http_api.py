"""The OpenAI-compatible images API: the HTTP edge beside the gRPC one, on the same servicer.

Routes: `POST /v1/images/generations` (JSON), `POST /v1/images/edits` (multipart), `GET
/v1/models`, and `DELETE /v1/requests/{id}` (our extension; answered 501 until cancel by id is
served). Each request passes the same guard as a gRPC call (the RPC it is served as names the
role and the rate limit), becomes a `GenerateRequest` (`openai_params.py`), is validated and run
by the gRPC servicer's own `validate` / `generate` / `stream`, and is counted in the same metrics
with `protocol="http"`; an image request also gets its access-log line, its trace span and its
per-tenant count (`http_calls.py`). Errors take OpenAI's body, `{"error": {"message", "type",
"param", "code"}}`, with the HTTP status `base.errors.HTTP_STATUS` gives their gRPC status.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from typing import Any

from imagegen.v1 import imagegen_pb2 as pb
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..base.errors import (
    EngineUnavailable,
    ImageGenError,
    InternalError,
    InvalidArgument,
    RequestTooLarge,
    Status,
)
from ..base.metrics import Metrics
from ..base.types import GenerationParams
from .access_log import CURRENT_RECORD
from .auth import CURRENT_CALLER, Caller, Guard
from .http_calls import ClientGone, EventStream, HttpCall, until_disconnected
from .openai_bodies import (
    completed_event,
    error_body,
    error_response,
    images_body,
    partial_event,
    plain_error,
    server_sent,
)
from .openai_params import (
    OpenAIRequest,
    form_fields,
    images_request,
    openai_mask,
    parse_json_body,
)
from .service import ImageGenerationService
from .tracing import Tracing
from .transport import API_SERVICE

log = logging.getLogger(__name__)

GENERATE, STREAM, SERVER_INFO = "Generate", "StreamProgress", "GetServerInfo"
CANCEL = "CancelGeneration"
OWNER = "imagegen-serve"  # the `owned_by` of /v1/models
IMAGE_FIELDS = ("image", "image[]")  # one image, or the openai SDK's list of them
# The request's correlation id (gRPC's request_id): taken from the request, else made; sent back.
REQUEST_ID_HEADER = "X-Request-Id"


class HttpApi:
    """The routes, on the gRPC servicer; build once per server, serve `app` with uvicorn."""

    def __init__(
        self,
        service: ImageGenerationService,
        guard: Guard | None,
        metrics: Metrics,
        codec_pool: Executor,
        max_request_bytes: int,
        tracing: Tracing | None = None,
    ) -> None:
        self._service = service
        self._guard = guard
        self._metrics = metrics
        self._tracing = tracing or Tracing(None)  # request spans; off by default
        self._codec_pool = codec_pool
        self._max_request_bytes = max_request_bytes
        self._started = int(time.time())  # the `created` of /v1/models
        self.app = Starlette(
            routes=[
                Route("/v1/images/generations", self._generations, methods=["POST"]),
                Route("/v1/images/edits", self._edits, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/v1/requests/{request_id}", self._cancel_request, methods=["DELETE"]),
            ],
            exception_handlers={404: _no_such_route, 405: _no_such_route},
        )

    # --- routes ---

    async def _generations(self, request: Request) -> Response:
        async def answer() -> Response:
            self._check_caller(request, GENERATE)
            parsed = self._images_request(request, parse_json_body(await self._body(request)))
            return await self._run(request, parsed, "image_generation")

        return await self._answered(request, GENERATE, answer)

    async def _edits(self, request: Request) -> Response:
        async def answer() -> Response:
            self._check_caller(request, GENERATE)
            body = await self._body(request)
            return await self._run(request, await self._edit_request(request, body), "image_edit")

        return await self._answered(request, GENERATE, answer)

    async def _models(self, request: Request) -> Response:
        async def answer() -> Response:
            self._check_caller(request, SERVER_INFO)
            model = self._service.model
            if model is None:
                raise EngineUnavailable("model loading; retry shortly")
            # The model, then each variant: a client picks a variant as it picks a model.
            names = [model.name, *(variant.name for variant in self._service.variants)]
            entries = [
                {"id": name, "object": "model", "created": self._started, "owned_by": OWNER}
                for name in names
            ]
            return JSONResponse({"object": "list", "data": entries})

        return await self._answered(request, SERVER_INFO, answer)

    async def _cancel_request(self, request: Request) -> Response:
        """Cancel by id (our extension, not OpenAI's): CancelGeneration for the request_id the
        server reported (`X-Request-Id`), or for an idempotency key given as `?key=1` with the
        key in the path; scoped to the caller like the RPC."""

        async def answer() -> Response:
            self._check_caller(request, CANCEL)
            target = request.path_params["request_id"]
            by_key = request.query_params.get("key") == "1"
            state = self._service.cancel(
                idempotency_key=target if by_key else "", request_id="" if by_key else target
            )
            return JSONResponse({"id": target, "object": "request.cancellation", "state": state})

        return await self._answered(request, CANCEL, answer)

    # --- the request's path ---

    async def _answered(
        self, request: Request, rpc: str, answer: Callable[[], Awaitable[Response]]
    ) -> Response:
        """Maps what `answer` raises to OpenAI's error body and counts the request as `rpc`
        (StreamProgress once its body asked for a stream); an image request (`rpc` Generate)
        also gets its access line and trace span. A stream counts itself when it ends."""
        started, message = time.perf_counter(), ""
        call = request.state.call = self._open_call(request, rpc)
        try:
            with call.span.current() if call is not None else contextlib.nullcontext():
                response = await answer()
        except ImageGenError as error:
            response, code, message = error_response(error), error.status.name, error.message
        except (ClientGone, ClientDisconnect):
            response, code = Response(status_code=499), Status.CANCELLED.name  # nobody reads it
        except Exception as error:
            log.error("unhandled error in HTTP request", exc_info=error)
            response = error_response(InternalError("internal error; see the server log"))
            code, message = Status.INTERNAL.name, "internal error"
        else:
            if isinstance(response, EventStream):
                return response
            code = "OK"
        rpc = getattr(request.state, "rpc", rpc)
        self._metrics.count_request("http", rpc, code, time.perf_counter() - started)
        if call is not None:
            call.close(self._metrics, rpc, code, message)
        return response

    def _open_call(self, request: Request, rpc: str) -> HttpCall | None:
        """An image request's access record and span (None for the other routes)."""
        if rpc != GENERATE:
            return None
        return HttpCall.open(rpc, request.headers, self._tracing)

    def _check_caller(self, request: Request, rpc: str) -> Caller | None:
        """The gRPC guard, with the RPC this route is served as: the same tokens, roles and
        rate buckets for both protocols. Returns the caller (None without a guard): what
        idempotency keys and cancel by id are scoped to."""
        if self._guard is None:
            return None
        client = request.client
        peer = f"http:{client.host}:{client.port}" if client else "http:unknown:0"
        authorization = request.headers.get("authorization", "")
        caller = self._guard.check(f"{API_SERVICE}{rpc}", [("authorization", authorization)], peer)
        CURRENT_CALLER.set(caller)  # what the servicer scopes idempotency keys and cancels by
        record = CURRENT_RECORD.get()
        if record is not None:
            record.note_policy(caller.policy)
        return caller

    async def _body(self, request: Request) -> bytes:
        """The body, refused past max_request_bytes before it is read in full: at once when
        Content-Length says so, else as soon as the bytes received pass the limit."""
        limit = self._max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit)
        chunks, received = [], 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise _too_large(received, limit)
            chunks.append(chunk)
        return b"".join(chunks)

    def _images_request(self, request: Request, fields: dict[str, Any]) -> OpenAIRequest:
        if fields.get("stream") is True:  # counted as a stream even when refused
            request.state.rpc = STREAM
        model, limits = self._service.model, self._service.limits
        if model is None or limits is None:
            raise EngineUnavailable("model loading; retry shortly")
        variants = [variant.name for variant in self._service.variants]
        parsed = images_request(fields, model.name, limits, variants)
        parsed.message.request_id = request.headers.get("x-request-id", "")
        parsed.message.idempotency_key = idempotency_key(request)
        return parsed

    async def _edit_request(self, request: Request, body: bytes) -> OpenAIRequest:
        """A multipart edit: its text fields as a generations body, its images as init image
        and mask (a text-to-image model) or as reference images (an edit model)."""

        async def replay() -> dict[str, Any]:  # the body, already read within the limit
            return {"type": "http.request", "body": body, "more_body": False}

        form = await Request(request.scope, replay).form()
        texts = {name: value for name, value in form.multi_items() if isinstance(value, str)}
        for name in (*IMAGE_FIELDS, "mask"):
            if texts.pop(name, None) is not None:
                raise InvalidArgument(name, "expected a file upload, got a text field")
        parsed = self._images_request(request, form_fields(texts))
        images = [
            await value.read()
            for name, value in form.multi_items()
            if name in IMAGE_FIELDS and isinstance(value, UploadFile)
        ]
        await self._attach_images(parsed.message, images, form.get("mask"))
        return parsed

    async def _attach_images(
        self, message: pb.GenerateRequest, images: list[bytes], mask: Any
    ) -> None:
        limits = self._service.limits
        assert limits is not None  # _images_request checked it
        if not images:
            raise InvalidArgument("image", "an edit needs an image file (image or image[])")
        if limits.max_reference_images > 0:
            # An edit model: the images are its references (reference editing validates them).
            message.reference_images.extend(images)
            return
        if len(images) > 1:
            raise InvalidArgument(
                "image", f"{len(images)} images; this text-to-image model edits one"
            )
        message.init_image = images[0]
        if isinstance(mask, UploadFile):
            data = await mask.read()
            loop = asyncio.get_running_loop()
            message.mask_image = await loop.run_in_executor(
                self._codec_pool, openai_mask, data, limits.max_init_image_pixels
            )

    async def _run(self, request: Request, parsed: OpenAIRequest, kind: str) -> Response:
        """Validates with the gRPC path's validator and runs the request: one JSON body, or
        server-sent events while it runs."""
        params = await self._service.validate(parsed.message, streaming=parsed.stream)
        if parsed.stream:
            params = with_partial_images(params, parsed.partial_images)
            call: HttpCall = request.state.call
            started = time.perf_counter()
            return EventStream(
                self._events(params, parsed, kind, call),
                media_type="text/event-stream",
                headers={REQUEST_ID_HEADER: params.request_id},
                # A client gone before the first event: the stream never ran to count itself.
                on_end=lambda: self._stream_ended(call, started, Status.CANCELLED.name, ""),
            )
        key = parsed.message.idempotency_key
        response = await until_disconnected(
            request.receive, self._service.generate(params, None, key)
        )
        return JSONResponse(
            images_body(response, parsed), headers={REQUEST_ID_HEADER: params.request_id}
        )

    async def _events(
        self, params: GenerationParams, parsed: OpenAIRequest, kind: str, call: HttpCall
    ) -> AsyncIterator[bytes]:
        """The stream's events: `<kind>.partial_image` from the step previews of the first
        image, then one `<kind>.completed` per image, or `error`. Counted when it ends."""
        started, code, message, partials = time.perf_counter(), "OK", "", 0
        size = f"{params.width}x{params.height}"
        CURRENT_RECORD.set(call.record)  # (this runs in the response's task)
        try:
            with call.span.current():
                stream = self._service.stream(params, None, parsed.message.idempotency_key)
                async with contextlib.aclosing(stream) as events:
                    async for event in events:
                        if event.WhichOneof("event") == "step":
                            for preview in event.step.previews:
                                if preview.image_index == 0 and partials < parsed.partial_images:
                                    yield partial_event(kind, preview.data, partials, size)
                                    partials += 1
                        elif event.WhichOneof("event") == "completed":
                            for image in event.completed.response.images:
                                yield completed_event(kind, image, size, parsed.output_format)
        except ImageGenError as error:
            code, message = error.status.name, error.message
            yield server_sent("error", error_body(error))
        except (asyncio.CancelledError, GeneratorExit):
            code = Status.CANCELLED.name
            raise
        except Exception as error:
            code, message = Status.INTERNAL.name, "internal error"
            log.error("unhandled error in HTTP stream", exc_info=error)
            yield server_sent("error", error_body(InternalError("internal error; see the log")))
        finally:
            self._stream_ended(call, started, code, message)

    def _stream_ended(self, call: HttpCall, started: float, code: str, message: str) -> None:
        """Counts a stream and closes its call, once (its events, or a client that left before
        they began)."""
        if not call.closed:
            self._metrics.count_request("http", STREAM, code, time.perf_counter() - started)
            call.close(self._metrics, STREAM, code, message)


async def _no_such_route(request: Request, error: Exception) -> Response:
    """Starlette's 404 and 405, in OpenAI's error body."""
    status = error.status_code if isinstance(error, HTTPException) else 404
    message = f"{request.method} {request.url.path}: no such route (see /v1/models, /v1/images/*)"
    return plain_error(status, message, "unknown_route")


def idempotency_key(request: Request) -> str:
    """The `Idempotency-Key` header, carried as the gRPC field of the same meaning: HTTP
    requests get idempotency through the servicer's own path (`api/jobs.py`)."""
    return request.headers.get("idempotency-key", "")


def with_partial_images(params: GenerationParams, partial_images: int) -> GenerationParams:
    """Previews spread over the steps for `partial_images` of them: one every steps / (k + 1)
    steps (the engine makes none after the last step), so k = 2 over 8 steps sends steps 2, 4."""
    if partial_images == 0:
        return params
    every = max(params.steps // (partial_images + 1), 1)
    return dataclasses.replace(params, preview_every_n_steps=every)


def _too_large(size: int, limit: int) -> RequestTooLarge:
    return RequestTooLarge(f"request body of {size} bytes exceeds max_request_bytes {limit}")
