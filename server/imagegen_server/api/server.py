"""Builds the gRPC server (and the HTTP API beside it) from the settings and runs its life: load,
warm up, serve, drain.

The server listens at once with health NOT_SERVING (so orchestrators see a live process during a
long model load); the engine thread loads the model, runs a warm-up batch, and only then does
health turn SERVING. SIGTERM starts a graceful drain: NOT_SERVING at once, new requests get
UNAVAILABLE (HTTP 503), queued and running ones finish (bounded by drain_timeout_s), then exit 0.
A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import NoReturn

import grpc
from grpc_health.v1 import _async as health_aio  # what grpc_health.v1.health.aio names
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc

from ..base.adapter_files import AdapterDirectory
from ..base.config import Settings
from ..base.engine_api import EngineLike, EngineRequest
from ..base.metrics import Metrics
from ..base.types import BatchKey, GenerationParams, OutputFormat
from ..base.variants import default_variant
from ..batching.batcher import Batcher
from ..batching.scheduler import Scheduler, SchedulerConfig
from ..engine.startup import EngineSetup, build_engine, row_limit
from .adapters import AdapterRegistry
from .admin import AdapterAdminService
from .auth import Guard
from .http_api import HttpApi
from .http_server import HttpServer
from .idempotency import JobSettings
from .interceptors import StatusInterceptor
from .jobs import JobTable, codec_encoder
from .quota import QuotaBook
from .quota_stores import open_store
from .service import ImageGenerationService
from .tokens_reload import TokensWatcher
from .tracing import Tracing
from .transport import EXCLUSIVE_PORT, build_guard, server_credentials, server_options
from .validation import RequestValidator

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ImageGeneration"].full_name
ADMIN_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AdapterAdmin"].full_name
HEALTH_SERVICES = ("", SERVICE_NAME)
WARMUP_STEPS = 2
RPC_FLUSH_S = 5.0  # after the drain: time for finished RPCs to encode and send their images


def scheduler_config(settings: Settings) -> SchedulerConfig:
    return SchedulerConfig(
        policy=settings.batching,
        max_batch_size=settings.max_batch_size,
        max_queue_delay_s=settings.max_queue_delay_ms / 1000,
        preferred_batch_sizes=tuple(settings.preferred_batch_sizes),
        max_queue_size=settings.max_queue_size,
        max_active_batches=settings.max_active_batches,
        default_queue_timeout_s=settings.default_queue_timeout_ms / 1000,
        row_limit_recovery_s=settings.row_limit_recovery_s,
        row_selection=settings.row_selection,
    )


class ImageGenServer:
    """One server process: gRPC + health + reflection + metrics around one engine thread."""

    def __init__(self, settings: Settings, tracing: Tracing | None = None) -> None:
        self.settings = settings
        tracing = tracing or Tracing.from_environment()  # OTEL_* variables; off by default
        self.metrics = Metrics()
        self.port = 0
        self.metrics_port = 0
        self._health = health_aio.HealthServicer()
        self._codec_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="codec")
        self._ready = asyncio.Event()
        self._failed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._batcher = Batcher(
            engine_factory=self._build_engine,
            scheduler=Scheduler(scheduler_config(settings)),
            metrics=self.metrics,
            warmup=self._warmup_request() if settings.warmup else None,
            on_ready=self._engine_ready,
            on_failure=self._engine_failed,
            row_limit=self._row_limit,
            separate_adapters=settings.adapter_batching == "separate",
        )
        self._adapters = AdapterRegistry(
            AdapterDirectory(settings.adapter_dir),
            settings.max_loaded_adapters,
            self._batcher.call_on_engine,
            self.metrics,
        )
        self._setup: EngineSetup | None = None  # once the engine thread has built the engine
        store, blocking = open_store(settings.quota_store)
        self._quotas = QuotaBook(
            store, settings.quota_store_failure, self.metrics, blocking=blocking
        )
        self._tracing = tracing
        self.jobs = self._job_table(tracing)
        self._service = self._servicer(tracing)
        guard = build_guard(settings)  # one for both protocols: one rate bucket per caller
        self.tokens = _tokens_watcher(settings, guard)  # None without a tokens file
        self._grpc = grpc.aio.server(
            interceptors=[StatusInterceptor(self.metrics, guard, tracing)],
            options=server_options(settings),
        )
        self.http_port = 0
        self._http = self._http_server(guard)
        # A plaintext health-only port for probes that cannot speak TLS (the kubelet's).
        self._health_grpc = (
            grpc.aio.server(options=[EXCLUSIVE_PORT]) if settings.health_port is not None else None
        )
        self._register_services()

    def _job_table(self, tracing: Tracing) -> JobTable:
        settings = self.settings
        return JobTable(
            self._batcher,
            self._adapters,
            codec_encoder(self._codec_pool, self.metrics, tracing),
            JobSettings(
                window_s=settings.idempotency_window_s,
                max_entries=settings.idempotency_max_entries,
                max_bytes=settings.idempotency_max_bytes,
            ),
            self.metrics,
            quotas=self._quotas,
            tracing=tracing,
        )

    def _servicer(self, tracing: Tracing) -> ImageGenerationService:
        settings = self.settings
        return ImageGenerationService(
            self._batcher,
            self._batching_info(),
            self.metrics,
            self._codec_pool,
            self._adapters,
            self.jobs,
            quotas=self._quotas,
            log_prompts=settings.log_prompts,
            tracing=tracing,
        )

    def _http_server(self, guard: Guard | None) -> HttpServer | None:
        """The OpenAI-compatible HTTP edge on the same event loop, when --http-port is set."""
        settings = self.settings
        if settings.http_port is None:
            return None
        api = HttpApi(
            self._service,
            guard,
            self.metrics,
            self._codec_pool,
            settings.max_request_bytes,
            self._tracing,
        )
        return HttpServer(api.app, settings, grace_s=RPC_FLUSH_S)

    def _register_services(self) -> None:
        """The servicers, health (also on the health-only port) and reflection."""
        if self._health_grpc is not None:
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._health_grpc)
        pb_grpc.add_ImageGenerationServicer_to_server(self._service, self._grpc)
        pb_grpc.add_AdapterAdminServicer_to_server(AdapterAdminService(self._adapters), self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                ADMIN_SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self._grpc,
        )

    @property
    def batcher(self) -> Batcher:
        return self._batcher

    async def start(self) -> None:
        """Binds the ports and starts loading the model; returns before the model is ready."""
        self._loop = asyncio.get_running_loop()
        settings = self.settings
        self.metrics_port = self.metrics.serve(
            settings.resolved_metrics_host, settings.metrics_port
        )
        address = f"{settings.host}:{settings.port}"
        credentials = server_credentials(settings)
        if credentials is None:
            self.port = self._grpc.add_insecure_port(address)
        else:
            self.port = self._grpc.add_secure_port(address, credentials)
        if self._health_grpc is not None:  # bound before either starts: a taken port stops both
            self.health_port = self._health_grpc.add_insecure_port(
                f"{settings.host}:{settings.health_port}"
            )
        for service in HEALTH_SERVICES:
            await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._http is not None:  # bound before gRPC starts: a taken port stops both
            self.http_port = await self._http.start()
        await self._grpc.start()
        if self._health_grpc is not None:
            await self._health_grpc.start()
        log.info(
            "gRPC on %s:%d, metrics on %s:%d%s",
            settings.host,
            self.port,
            settings.resolved_metrics_host,
            self.metrics_port,
            f", HTTP on {settings.host}:{self.http_port}" if self._http is not None else "",
        )
        self._batcher.start()
        if self.tokens is not None:
            self.tokens.start()

    def reload_tokens(self) -> None:
        """SIGHUP: re-reads the tokens file (see tokens_reload.py)."""
        if self.tokens is None:
            log.warning("SIGHUP: no tokens file to reload (auth_tokens_file is unset)")
        else:
            self.tokens.reload()

    async def wait_ready(self) -> bool:
        """Waits until SERVING (True) or the engine failed to start (False)."""
        ready = asyncio.ensure_future(self._ready.wait())
        failed = asyncio.ensure_future(self._failed.wait())
        await asyncio.wait((ready, failed), return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        failed.cancel()
        return self._ready.is_set()

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Graceful drain: NOT_SERVING, refuse new work, finish what was accepted, stop.

        Returns True if everything accepted finished within the timeout.
        """
        timeout = self.settings.drain_timeout_s if timeout_s is None else timeout_s
        log.info("draining (up to %.1fs)", timeout)
        self.metrics.ready.set(0)
        await self._health.enter_graceful_shutdown()
        self._batcher.begin_drain()
        finished = await self._batcher.wait_idle(timeout)
        if not finished:  # what is left stops here, not after the flush below
            self._batcher.stop(
                timeout_s=0, reason=f"drain timeout ({timeout:g}s) passed; retry on another replica"
            )
        # The engine has answered everyone; the calls only need to encode and send their images.
        # The whole drain stays within drain_timeout_s + RPC_FLUSH_S.
        await asyncio.gather(self._grpc.stop(grace=RPC_FLUSH_S), self._stop_http(graceful=True))
        if self._health_grpc is not None:
            await self._health_grpc.stop(grace=0)
        self._batcher.stop()
        self._codec_pool.shutdown(wait=False)
        await self._quotas.settled()  # charges of refused requests given back to the store
        if self.tokens is not None:
            await self.tokens.stop()
        log.info("drained %s", "cleanly" if finished else "with requests left at the timeout")
        return finished

    async def stop_now(self) -> None:
        self.metrics.ready.set(0)
        if self.tokens is not None:
            await self.tokens.stop()
        await self._grpc.stop(grace=0)
        if self._health_grpc is not None:
            await self._health_grpc.stop(grace=0)
        self._batcher.stop(timeout_s=0.5)
        # After the batcher: it has answered every waiting HTTP request, whose connections then
        # finish instead of holding the listener open.
        await self._stop_http(graceful=False)
        self._codec_pool.shutdown(wait=False)

    async def _stop_http(self, graceful: bool) -> None:
        if self._http is not None:
            await self._http.stop(graceful)

    # --- engine thread callbacks ---

    def _build_engine(self) -> EngineLike:
        # Stored for the event loop, which reads it once the engine is ready (_mark_serving); the
        # engine thread never touches the servicer.
        self._setup = build_engine(self.settings, self._adapters.directory, self.metrics)
        return self._setup.engine

    def _row_limit(self, key: BatchKey) -> int | None:
        return row_limit(self.settings, self._setup, key) if self._setup is not None else None

    def _engine_ready(self, engine: EngineLike) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._mark_serving()))

    async def _mark_serving(self) -> None:
        if not self._batcher.ready:  # a drain began meanwhile: never SERVING
            return
        setup = self._setup
        assert setup is not None
        validator = RequestValidator(
            setup.limits, setup.count_tokens, self._adapters.selectable, setup.variants
        )
        self._service.set_model(validator, setup.description, setup.probed, setup.variants)
        self.metrics.add_variants([variant.name for variant in setup.variants])
        self._adapters.adopt(setup.preloaded, setup.preloaded_parameters)
        for service in HEALTH_SERVICES:
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.metrics.ready.set(1)
        self._ready.set()
        log.info("SERVING")

    def _engine_failed(self, error: BaseException) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._mark_failed()))

    async def _mark_failed(self) -> None:
        self.metrics.ready.set(0)
        for service in HEALTH_SERVICES:
            await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._failed.set()

    def _warmup_request(self) -> EngineRequest:
        """One image at the default size: the first real batch compiles kernels and fills caches."""
        settings = self.settings
        variant = default_variant(settings.variants)
        params = GenerationParams(
            request_id="warm-up",
            prompt="warm-up",
            negative_prompt="",
            width=settings.default_width,
            height=settings.default_height,
            steps=min(WARMUP_STEPS, settings.max_steps),
            guidance_scale=1.0,
            seed=0,
            num_images=1,
            output_format=OutputFormat.PNG,
            output_quality=settings.default_output_quality,
            # The default variant's LoRAs and schedule, as most requests will run.
            variant=variant.name if variant is not None else "",
        )
        return EngineRequest("warm-up", params)

    def _batching_info(self) -> pb.BatchingInfo:
        settings = self.settings
        return pb.BatchingInfo(
            policy=settings.batching,
            max_batch_size=settings.max_batch_size,
            max_queue_delay_ms=settings.max_queue_delay_ms,
            max_queue_size=settings.max_queue_size,
            preferred_batch_sizes=settings.preferred_batch_sizes,
            row_selection=settings.row_selection,
        )


async def serve(settings: Settings) -> int:
    """Runs a server until SIGTERM/SIGINT; returns the process exit code."""
    # Signals are caught before the ports open: one that comes as the server starts drains it.
    loop = asyncio.get_running_loop()
    signals: asyncio.Queue[int] = asyncio.Queue()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, signals.put_nowait, signum)
    try:
        server = ImageGenServer(settings)
        loop.add_signal_handler(signal.SIGHUP, server.reload_tokens)
        await server.start()
    except (ValueError, OSError, RuntimeError) as error:  # bad token file, port in use, ...
        log.error("cannot start: %s", error)
        return 2
    ready = asyncio.ensure_future(server.wait_ready())
    first_signal = asyncio.ensure_future(signals.get())
    await asyncio.wait((ready, first_signal), return_when=asyncio.FIRST_COMPLETED)
    if ready.done() and not ready.result():
        log.error("engine failed to start; exiting")
        first_signal.cancel()
        await server.stop_now()
        return 1
    received = await first_signal
    ready.cancel()
    log.info(
        "signal %s: graceful drain; send it again to stop at once", signal.Signals(received).name
    )
    drain = asyncio.ensure_future(server.drain())
    second_signal = asyncio.ensure_future(signals.get())
    await asyncio.wait((drain, second_signal), return_when=asyncio.FIRST_COMPLETED)
    if not drain.done():
        log.warning("second signal: stopping now")
        drain.cancel()
        await server.stop_now()
        _exit_now(0)
    second_signal.cancel()
    if server.batcher.engine_running:  # a signal during start-up: still loading or compiling
        log.info("engine still busy after the drain; exiting now")
        _exit_now(0)
    return 0


def _exit_now(code: int) -> NoReturn:
    """Leaves the process at once. The engine thread may be inside a long torch call (loading,
    compiling); finalizing the interpreter under it aborts the process."""
    logging.shutdown()
    os._exit(code)


def _tokens_watcher(settings: Settings, guard: Guard | None) -> TokensWatcher | None:
    """Reloads the tokens file on SIGHUP and on change; None without a tokens file."""
    if guard is None or settings.auth_tokens_file is None:
        return None
    return TokensWatcher(guard, settings.auth_tokens_file, settings.auth_tokens_poll_s)
