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
from ..base.errors import EngineUnavailable
from ..base.metrics import Metrics
from ..base.types import (
    FailedEvent,
    GenerationParams,
    ModelDescription,
    QueuedEvent,
    StartedEvent,
    StepEvent,
)
from ..batching.batcher import Batcher
from .adapters import AdapterRegistry
from .admin import adapter_message
from .auth import current_identity
from .codec import encode_preview
from .idempotency import check_key
from .jobs import JobOrder, JobResult, JobTable, Subscription
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
        jobs: JobTable,
    ) -> None:
        self._batcher = batcher
        self._jobs = jobs
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
        with self._subscribed(request, params, context, streaming=False) as subscription:
            async for event in subscription.events():
                if isinstance(event, FailedEvent):
                    raise event.error
                if isinstance(event, JobResult):
                    return self._response(params, event, subscription)
        raise AssertionError("a job ends with a result or a failure")

    async def StreamProgress(
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.ProgressEvent]:
        params = await self._validate(request, streaming=True)
        request_id = params.request_id
        with self._subscribed(request, params, context, streaming=True) as subscription:
            async for event in subscription.events():
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
                else:
                    response = self._response(params, event, subscription)
                    yield pb.ProgressEvent(
                        request_id=request_id, completed=pb.Completed(response=response)
                    )

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
        info.adapters.extend(
            adapter_message(file, loaded=True) for file in self._adapters.loaded_files()
        )
        return info

    async def CancelGeneration(
        self, request: pb.CancelGenerationRequest, context: Context
    ) -> pb.CancelGenerationResponse:
        identity, admin = current_identity()
        state = self._jobs.cancel(
            None if admin else identity,
            key=request.idempotency_key,
            request_id=request.request_id,
        )
        return pb.CancelGenerationResponse(state=state)

    # --- helpers ---

    async def _validate(self, request: pb.GenerateRequest, streaming: bool) -> GenerationParams:
        validator = self._validator
        if validator is None:
            raise EngineUnavailable("model loading; retry shortly")
        check_key(request.idempotency_key)
        images = None
        if request.init_image:  # decoding and resizing take a while: not on the event loop
            loop = asyncio.get_running_loop()
            images = await loop.run_in_executor(self._codec_pool, validator.decode_images, request)
        # Adapters on demand: loaded (once, however many ask) before validation, which then
        # runs with no await before the job holds them, so none is evicted in between.
        await self._adapters.ensure_loaded(adapter.name for adapter in request.adapters)
        return validator.validate(request, streaming, images)

    @contextlib.contextmanager
    def _subscribed(
        self,
        request: pb.GenerateRequest,
        params: GenerationParams,
        context: Context,
        streaming: bool,
    ) -> Iterator[Subscription]:
        """The call's subscription to its job (new, or the one its idempotency key names)."""
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        identity, _admin = current_identity()
        key = check_key(request.idempotency_key)
        order = JobOrder(identity, key, params, deadline, wants_progress=streaming)
        with self._jobs.start(order) as subscription:
            yield subscription

    def _response(
        self, params: GenerationParams, result: JobResult, subscription: Subscription
    ) -> pb.GenerateResponse:
        self._metrics.images.inc(len(result.images))
        response = pb.GenerateResponse(
            request_id=params.request_id,
            timings=pb.Timings(
                queued_seconds=result.queued_s,
                compute_seconds=result.compute_s,
                total_seconds=time.monotonic() - subscription.accepted_at,
            ),
            batch_size=result.max_batch_size,
            mean_batch_size=result.mean_batch_size,
            model=self._model.name if self._model else "",
        )
        for image in result.images:
            response.images.add(
                data=image.data,
                mime_type=params.output_format.mime_type,
                width=params.width,
                height=params.height,
                seed=image.seed,
            )
        return response

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
