"""The gRPC servicer: converts protobuf to internal types, validates, delegates to the batcher.

Errors are raised as typed ImageGenErrors and turned into gRPC statuses by the interceptor
(interceptors.py), the one place that mapping happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc

from .. import __version__
from ..base.cost import COST_UNIT, request_cost
from ..base.errors import EngineUnavailable
from ..base.limits import RequestLimits
from ..base.metrics import Metrics
from ..base.types import (
    FailedEvent,
    GenerationParams,
    ModelDescription,
    QueuedEvent,
    StartedEvent,
    StepEvent,
)
from ..base.variants import Variant
from ..batching.batcher import Batcher
from .access_log import CURRENT_RECORD
from .adapters import AdapterRegistry
from .admin import adapter_message
from .auth import CURRENT_CALLER, current_identity
from .codec import encode_preview
from .idempotency import check_key
from .jobs import JobOrder, JobResult, JobTable, Subscription
from .policy import Tenant
from .quota import Charge, QuotaBook
from .references import decode_references
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
        jobs: JobTable,
        quotas: QuotaBook | None = None,
        log_prompts: bool = False,
        tracing: Tracing | None = None,
    ) -> None:
        self._tracing = tracing or Tracing(None)  # request spans; off by default
        self._batcher = batcher
        self._jobs = jobs
        self._quotas = quotas  # per-tenant cost limits; None = no token policies, no quotas
        self._log_prompts = log_prompts  # access-log lines carry the prompt text
        self._adapters = adapters
        self._batching = batching
        self._metrics = metrics
        self._codec_pool = codec_pool
        # Set once the engine thread has loaded the model (see set_model).
        self._validator: RequestValidator | None = None
        self._model: ModelDescription | None = None
        self._variants: list[Variant] = []

    def set_model(
        self,
        validator: RequestValidator,
        model: ModelDescription,
        batch_limits: list[tuple[int, int, int]],
        variants: list[Variant] | None = None,
    ) -> None:
        """What start-up learned, once, on the event loop: the validator, the model's facts,
        the memory probe's largest batch per (width, height) and the variants."""
        self._validator = validator
        self._model = model
        self._variants = variants or []
        for width, height, rows in batch_limits:
            self._batching.batch_limits.add(width=width, height=height, max_batch_size=rows)

    async def Generate(self, request: pb.GenerateRequest, context: Context) -> pb.GenerateResponse:
        params = await self.validate(request, streaming=False)
        return await self.generate(params, _deadline(context), request.idempotency_key)

    async def StreamProgress(
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.ProgressEvent]:
        params = await self.validate(request, streaming=True)
        events = self.stream(params, _deadline(context), request.idempotency_key)
        # Closed here, not by the garbage collector: a cancelled RPC drops its work at once.
        async with contextlib.aclosing(events) as closing:
            async for event in closing:
                yield event

    # --- what both protocols call (gRPC above, HTTP in http_api.py) ---

    @property
    def model(self) -> ModelDescription | None:
        """The served model's facts; None until start-up has loaded it."""
        return self._model

    @property
    def variants(self) -> list[Variant]:
        """The served variants (none on a server without `--variants`)."""
        return self._variants

    @property
    def limits(self) -> RequestLimits | None:
        """The request limits; None until start-up has loaded the model."""
        return self._validator.limits if self._validator is not None else None

    async def generate(
        self, params: GenerationParams, deadline: float | None, idempotency_key: str = ""
    ) -> pb.GenerateResponse:
        """Runs a validated request to its response (images encoded); raises its typed error.
        With an idempotency key, joins or replays the caller's request under that key."""
        admission = await self._authorize(params, idempotency_key)
        with self._subscribed(params, deadline, idempotency_key, False, admission) as subscription:
            async for event in subscription.events():
                if isinstance(event, FailedEvent):
                    raise event.error
                if isinstance(event, JobResult):
                    return self._response(params, event, subscription)
        raise AssertionError("a job ends with a result or a failure")

    async def stream(
        self, params: GenerationParams, deadline: float | None, idempotency_key: str = ""
    ) -> AsyncGenerator[pb.ProgressEvent, None]:
        """Runs a validated request, yielding its progress events and then `completed` (a
        repeat under an idempotency key picks up at the current step)."""
        request_id = params.request_id
        admission = await self._authorize(params, idempotency_key)
        with self._subscribed(params, deadline, idempotency_key, True, admission) as subscription:
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
            info.pipeline = model.pipeline
            info.fused_adapters.extend(model.fused_adapters)
            info.limits.CopyFrom(self._limits_message())
            info.variants.extend(_variant_message(variant) for variant in self._variants)
        info.cost_unit = COST_UNIT
        info.adapters.extend(
            adapter_message(file, loaded=True) for file in self._adapters.loaded_files()
        )
        return info

    async def CancelGeneration(
        self, request: pb.CancelGenerationRequest, context: Context
    ) -> pb.CancelGenerationResponse:
        state = self.cancel(idempotency_key=request.idempotency_key, request_id=request.request_id)
        return pb.CancelGenerationResponse(state=state)

    def cancel(self, *, idempotency_key: str = "", request_id: str = "") -> str:
        """Cancels the caller's request (an admin: anyone's) by key or id; returns where it was.

        Raises:
            NotFound, PermissionDenied, FailedPrecondition: naming the field (api/jobs.py).
        """
        identity, admin = current_identity()
        return self._jobs.cancel(
            None if admin else identity, key=idempotency_key, request_id=request_id
        )

    # --- helpers ---

    async def validate(self, request: pb.GenerateRequest, streaming: bool) -> GenerationParams:
        """The request's validated parameters (init images decoded on the codec pool).

        Raises:
            EngineUnavailable: the model is still loading.
            InvalidArgument, NotFound: naming the field.
        """
        validator = self._validator
        if validator is None:
            raise EngineUnavailable("model loading; retry shortly")
        check_key(request.idempotency_key)
        images = references = None
        loop = asyncio.get_running_loop()
        # Decoding and resizing take a while: not on the event loop.
        if request.init_image:
            images = await loop.run_in_executor(self._codec_pool, validator.decode_images, request)
        if request.reference_images:
            references = await loop.run_in_executor(
                self._codec_pool, decode_references, request, validator.limits
            )
        # Adapters on demand: loaded (once, however many ask) before validation, which then
        # runs with no await before the job holds them, so none is evicted in between.
        await self._adapters.ensure_loaded(adapter.name for adapter in request.adapters)
        return validator.validate(request, streaming, images, references)

    @contextlib.contextmanager
    def _subscribed(
        self,
        params: GenerationParams,
        deadline: float | None,
        idempotency_key: str,
        streaming: bool,
        admission: Admission,
    ) -> Iterator[Subscription]:
        """The call's subscription to its job (new, or the one its idempotency key names),
        scoped to the caller the guard identified (auth.CURRENT_CALLER); a new job is billed to
        the admission's tenant for fair share (the job table accounts it when it ends). When
        the call ends, its access-log timings are taken from the job."""
        identity, _admin = current_identity()
        key = check_key(idempotency_key)
        tenant = admission.tenant
        order = JobOrder(
            identity,
            key,
            params,
            deadline,
            streaming,
            tenant.name if tenant else "",
            tenant.weight if tenant else 1.0,
            self._tracing.enabled,
            admission.charge,
        )
        with self._jobs.start(order) as subscription:
            try:
                yield subscription
            finally:
                _note_run(subscription)

    async def _authorize(self, params: GenerationParams, idempotency_key: str) -> Admission:
        """Applies the caller's token policy (priority, adapters, variant) and charges the
        request's cost to its tenant's quota, unless its idempotency key names a job of this
        caller already (a repeat joins or replays it: no new work); returns the tenant (None
        without token policies) and the charge.

        Raises:
            PermissionDenied: naming the field the policy refuses.
            RateLimited: the tenant's quota is spent (RESOURCE_EXHAUSTED, retry-after-ms).
        """
        record = CURRENT_RECORD.get()
        cost = request_cost(params)
        if record is not None:
            record.note_params(params, params.variant, self._log_prompts)
            record.cost = cost
        caller = CURRENT_CALLER.get()
        policy = caller.policy if caller is not None else None
        if policy is None:
            return Admission(None, None)
        policy.check(params, params.variant)
        identity, _admin = current_identity()
        if idempotency_key and self._jobs.names_job(identity, idempotency_key):
            return Admission(policy.tenant, None)
        charge = None
        if self._quotas is not None:
            charge = await self._quotas.charge(policy.tenant, cost)
        self._metrics.tenant_cost_admitted.labels(tenant=policy.tenant.name).inc(cost)
        return Admission(policy.tenant, charge)

    def _response(
        self, params: GenerationParams, result: JobResult, subscription: Subscription
    ) -> pb.GenerateResponse:
        self._metrics.images.inc(len(result.images))
        if params.variant:
            self._metrics.variant_images.labels(variant=params.variant).inc(len(result.images))
        record = CURRENT_RECORD.get()
        if record is not None:
            record.bytes_out = result.size_bytes
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
            variant=params.variant,
            cost=request_cost(params),
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


@dataclass(frozen=True, slots=True)
class Admission:
    """Who a new job is billed to (None without token policies) and what its quota paid."""

    tenant: Tenant | None
    charge: Charge | None


def _note_run(subscription: Subscription) -> None:
    """The call ended: its access-log timings, from its job's request."""
    request = subscription.job.request
    record = CURRENT_RECORD.get()
    if request is not None and record is not None:
        record.note_run(request, time.monotonic())


def _variant_message(variant: Variant) -> pb.VariantInfo:
    return pb.VariantInfo(
        name=variant.name,
        loras=[pb.AdapterRef(name=label, scale=scale) for label, scale in variant.loras],
        scheduler_preset=variant.scheduler_preset,
        default_steps=variant.default_steps,
        default_guidance_scale=variant.default_guidance_scale,
        min_steps=variant.min_steps,
        max_steps=variant.max_steps,
        is_default=variant.is_default,
    )


def _deadline(context: Context) -> float | None:
    """The RPC's deadline on the monotonic clock; None when the client set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining
