"""The gRPC servicer: converts protobuf to internal types, validates, delegates to the batcher.

Errors are raised as typed ImageGenErrors and turned into gRPC statuses by the interceptor
(interceptors.py), the one place that mapping happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

import grpc
from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc

from .. import __version__
from ..base.cost import COST_UNIT, request_cost
from ..base.errors import EngineUnavailable
from ..base.metrics import Metrics
from ..base.request import RequestStatus
from ..base.types import (
    CompletedEvent,
    FailedEvent,
    GenerationParams,
    ModelDescription,
    QueuedEvent,
    StartedEvent,
    StepEvent,
)
from ..batching.batcher import Batcher
from ..batching.requests import RequestHandle
from .access_log import CURRENT_RECORD
from .adapters import AdapterRegistry
from .admin import adapter_message
from .auth import CURRENT_CALLER
from .codec import encode_image, encode_preview
from .policy import OTHER_TENANT, Tenant
from .quota import QuotaBook
from .tracing import Tracing
from .validation import OUTPUT_FORMATS, RequestValidator

if TYPE_CHECKING:  # generic only in grpc-stubs, not at run time
    Context = grpc.aio.ServicerContext[Any, Any]


class ImageGenerationService(pb_grpc.ImageGenerationServicer):
    def __init__(
        self,
        batcher: Batcher,
        batching: pb.BatchingInfo,
        metrics: Metrics,
        codec_pool: Executor,
        adapters: AdapterRegistry,
        quotas: QuotaBook | None = None,
        log_prompts: bool = False,
        tracing: Tracing | None = None,
    ) -> None:
        self._tracing = tracing or Tracing(None)  # request spans; off by default
        self._batcher = batcher
        self._quotas = quotas  # per-tenant cost limits; None = no token policies, no quotas
        self._log_prompts = log_prompts  # access-log lines carry the prompt text
        self._adapters = adapters
        self._batching = batching
        self._metrics = metrics
        self._codec_pool = codec_pool
        # Set once the engine thread has loaded the model (see set_model).
        self._validator: RequestValidator | None = None
        self._model: ModelDescription | None = None

    def set_model(
        self,
        validator: RequestValidator,
        model: ModelDescription,
        batch_limits: list[tuple[int, int, int]],
    ) -> None:
        """What start-up learned, once, on the event loop: the validator, the model's facts and
        the memory probe's largest batch per (width, height)."""
        self._validator = validator
        self._model = model
        for width, height, rows in batch_limits:
            self._batching.batch_limits.add(width=width, height=height, max_batch_size=rows)

    async def Generate(self, request: pb.GenerateRequest, context: Context) -> pb.GenerateResponse:
        params = await self._validate(request, streaming=False)
        tenant = await self._authorize(params, request)
        with self._admitted(params, context, wants_progress=False, tenant=tenant) as handle:
            while True:
                event = await handle.events.get()
                if isinstance(event, FailedEvent):
                    raise event.error
                if isinstance(event, CompletedEvent):
                    return await self._response(params, event, handle)

    async def StreamProgress(
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.ProgressEvent]:
        params = await self._validate(request, streaming=True)
        request_id = params.request_id
        tenant = await self._authorize(params, request)
        with self._admitted(params, context, wants_progress=True, tenant=tenant) as handle:
            while True:
                event = await handle.events.get()
                if isinstance(event, FailedEvent):
                    raise event.error
                if isinstance(event, QueuedEvent):
                    yield pb.ProgressEvent(
                        request_id=request_id,
                        queued=pb.Queued(
                            position=event.position,
                            estimated_start_seconds=event.estimated_start_s,
                        ),
                    )
                elif isinstance(event, StartedEvent):
                    yield pb.ProgressEvent(
                        request_id=request_id,
                        started=pb.Started(
                            batch_size=event.batch_size, queued_seconds=event.queued_s
                        ),
                    )
                elif isinstance(event, StepEvent):
                    yield pb.ProgressEvent(
                        request_id=request_id, step=await self._step_message(event)
                    )
                elif isinstance(event, CompletedEvent):
                    response = await self._response(params, event, handle)
                    yield pb.ProgressEvent(
                        request_id=request_id, completed=pb.Completed(response=response)
                    )
                    return

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: Context
    ) -> pb.ServerInfo:
        info = pb.ServerInfo(
            server_version=__version__, batching=self._batching, ready=self._batcher.ready
        )
        if self._model is not None and self._validator is not None:
            model = self._model
            info.model, info.device, info.dtype = model.name, model.device, model.dtype
            info.scheduler_preset = model.scheduler_preset
            info.fused_adapters.extend(model.fused_adapters)
            info.limits.CopyFrom(self._limits_message())
        info.cost_unit = COST_UNIT
        info.adapters.extend(
            adapter_message(file, loaded=True) for file in self._adapters.loaded_files()
        )
        return info

    async def CancelGeneration(
        self, request: pb.CancelGenerationRequest, context: Context
    ) -> pb.CancelGenerationResponse:
        # Declared with the proto surface of this round; cancel by id comes with idempotency.
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "CancelGeneration is not served yet")
        raise AssertionError("abort raises")

    # --- helpers ---

    async def _validate(self, request: pb.GenerateRequest, streaming: bool) -> GenerationParams:
        validator = self._validator
        if validator is None:
            raise EngineUnavailable("model loading; retry shortly")
        images = None
        if request.init_image:  # decoding and resizing take a while: not on the event loop
            loop = asyncio.get_running_loop()
            images = await loop.run_in_executor(self._codec_pool, validator.decode_images, request)
        return validator.validate(request, streaming, images)

    async def _authorize(
        self, params: GenerationParams, request: pb.GenerateRequest
    ) -> Tenant | None:
        """Applies the caller's token policy (priority, adapters, variant) and charges the
        request's cost to its tenant's quota; returns the tenant (None without token policies).

        Raises:
            PermissionDenied: naming the field the policy refuses.
            RateLimited: the tenant's quota is spent (RESOURCE_EXHAUSTED, retry-after-ms).
        """
        record = CURRENT_RECORD.get()
        if record is not None:
            record.note_params(params, request.variant, self._log_prompts)
            record.cost = request_cost(params)
        caller = CURRENT_CALLER.get()
        policy = caller.policy if caller is not None else None
        if policy is None:
            return None
        if record is not None:
            record.tenant, record.token = policy.tenant.name, policy.name
        policy.check(params, request.variant)
        cost = request_cost(params)
        if self._quotas is not None:
            await self._quotas.charge(policy.tenant, cost)
        self._metrics.tenant_cost_admitted.labels(tenant=policy.tenant.name).inc(cost)
        return policy.tenant

    @contextlib.contextmanager
    def _admitted(
        self,
        params: GenerationParams,
        context: Context,
        wants_progress: bool,
        tenant: Tenant | None = None,
    ) -> Iterator[RequestHandle]:
        """Queues the request (billed to `tenant`, for fair share) and holds its adapters until
        it ends; when the RPC ends early (cancelled, past its deadline, stream closed) its work
        is dropped."""
        self._adapters.hold(params.adapters)
        try:
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            name, weight = (tenant.name, tenant.weight) if tenant else ("", 1.0)
            traced = self._tracing.enabled
            handle = self._batcher.submit(params, deadline, wants_progress, name, weight, traced)
            try:
                yield handle
            finally:
                self._batcher.cancel(handle)  # a no-op once the request ended
                self._account(handle, tenant)
        finally:
            self._adapters.release(params.adapters)

    def _account(self, handle: RequestHandle, tenant: Tenant | None) -> None:
        """The request ended: its access-log timings and its tenant's metrics."""
        request = handle.request
        record = CURRENT_RECORD.get()
        if record is not None:
            record.note_run(request, time.monotonic())
        label = tenant.name if tenant is not None else OTHER_TENANT
        if request.started_at is not None:
            queued = request.started_at - request.arrival
            self._metrics.tenant_queue_time.labels(tenant=label).observe(queued)
        if request.status is RequestStatus.FINISHED:
            self._metrics.tenant_cost_served.labels(tenant=label).inc(request.cost)
        else:  # a finished request's spans were made when its images arrived (_response)
            self._tracing.record_run(request, time.monotonic(), decoded=False)

    async def _response(
        self, params: GenerationParams, event: CompletedEvent, handle: RequestHandle
    ) -> pb.GenerateResponse:
        self._tracing.record_run(handle.request, time.monotonic(), decoded=True)
        started = time.perf_counter()
        with self._tracing.span("encode", images=len(event.images)):
            encoded = await self._encode(params, event)
        self._metrics.stage.labels(stage="image_encode").observe(time.perf_counter() - started)
        self._metrics.images.inc(len(encoded))
        response = self._response_message(params, event, handle)
        for image, data in zip(event.images, encoded, strict=True):
            response.images.add(
                data=data,
                mime_type=params.output_format.mime_type,
                width=params.width,
                height=params.height,
                seed=image.seed,
            )
        record = CURRENT_RECORD.get()
        if record is not None:
            record.bytes_out = sum(len(data) for data in encoded)
        return response

    async def _encode(self, params: GenerationParams, event: CompletedEvent) -> list[bytes]:
        loop = asyncio.get_running_loop()
        encoded: list[bytes] = await asyncio.gather(
            *(
                loop.run_in_executor(
                    self._codec_pool,
                    encode_image,
                    image.pixels,
                    params.output_format,
                    params.output_quality,
                )
                for image in event.images
            )
        )
        return encoded

    def _response_message(
        self, params: GenerationParams, event: CompletedEvent, handle: RequestHandle
    ) -> pb.GenerateResponse:
        return pb.GenerateResponse(
            request_id=params.request_id,
            timings=pb.Timings(
                queued_seconds=event.queued_s,
                compute_seconds=event.compute_s,
                total_seconds=time.monotonic() - handle.accepted_at,
            ),
            batch_size=event.max_batch_size,
            mean_batch_size=event.mean_batch_size,
            model=self._model.name if self._model else "",
            cost=request_cost(params),
        )

    async def _step_message(self, event: StepEvent) -> pb.Step:
        step = pb.Step(step=event.step, total_steps=event.total_steps)
        if event.previews:
            loop = asyncio.get_running_loop()
            encoded = await asyncio.gather(
                *(
                    loop.run_in_executor(self._codec_pool, encode_preview, preview.pixels)
                    for preview in event.previews
                )
            )
            for preview, data in zip(event.previews, encoded, strict=True):
                height, width = preview.pixels.shape[:2]
                step.previews.add(
                    image_index=preview.image_index,
                    data=data,
                    mime_type="image/jpeg",
                    width=width,
                    height=height,
                )
        return step

    def _limits_message(self) -> pb.Limits:
        assert self._validator is not None
        return pb.Limits(
            **dataclasses.asdict(self._validator.limits),
            output_formats=sorted(
                {value for value in OUTPUT_FORMATS if value != pb.OUTPUT_FORMAT_UNSPECIFIED}
            ),
        )
