"""The naive baseline: a gRPC server that calls `QwenImagePipeline(...)` once per request.

One worker thread takes requests from a FIFO queue and runs the diffusers pipeline on each, alone
(no batching, no prompt cache), then encodes a PNG with Pillow. It answers the same
`imagegen.v1.ImageGeneration/Generate` RPC as the real server, reports SERVING through
grpc.health.v1 after a warm-up call, and exports the few metrics the bench reads. A request the
client cancelled while queued is skipped; one already running finishes (the pipeline cannot stop
mid-call).

    python -m bench naive-server --model .cache/bench-model --port 0 --metrics-port 0
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import torch
from diffusers import QwenImagePipeline
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc
from imagegen_server.engine.model import load_model
from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server

log = logging.getLogger("naive_server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ImageGeneration"].full_name
SIZE_MULTIPLE = 16  # VAE factor 8 x 2x2 latent packing, as the real server requires
WARMUP_STEPS = 2  # as the real server's warm-up batch


@dataclass(slots=True, eq=False)
class Job:
    """One accepted request, waiting for the worker."""

    request: pb.GenerateRequest
    width: int
    height: int
    steps: int
    seed: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[pb.GenerateResponse]
    accepted_at: float  # time.monotonic()


class Metrics:
    """The metrics the bench reads, named as the real server names them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.pending = Gauge(
            "imagegen_pending_requests", "Requests waiting for the worker", registry=self.registry
        )
        self.running_rows = Gauge(
            "imagegen_running_rows", "Images being generated (0 or 1)", registry=self.registry
        )
        self.batch_size = Histogram(
            "imagegen_batch_size",
            "Rows (images) in each denoising step: always 1 here",
            buckets=(1, 2, 4, 8),
            registry=self.registry,
        )


class Worker:
    """The only user of the pipeline: one thread loads it, warms it up and serves one request
    at a time. Torch runs in that thread alone, as in the real server's engine thread: with
    OpenMP, a second thread running torch ops (a load on the main thread, a warm-up on an
    executor) leaves two thread teams on the cores and made every request about 40% slower."""

    def __init__(self, args: argparse.Namespace, metrics: Metrics) -> None:
        self._args = args
        self._metrics = metrics
        self._model_name = args.model
        self._pipe: QwenImagePipeline | None = None
        self.jobs: queue.Queue[Job | None] = queue.Queue()

    def run(self, on_ready: Callable[[], object]) -> None:
        args = self._args
        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        # Loaded as the real server loads (from_pretrained, or the full-size stand-in's weights
        # drawn on the device); what differs is serving: `pipe(...)` per request.
        self._pipe = load_model(args.model, args.device, args.dtype).pipeline
        self._generate("warm-up", args.default_width, args.default_height, WARMUP_STEPS, seed=0)
        on_ready()
        while (job := self.jobs.get()) is not None:
            self._metrics.pending.set(self.jobs.qsize())
            if job.future.cancelled():  # the client gave up while it waited
                continue
            self._metrics.running_rows.set(1)
            try:
                response = self._serve(job)
            except Exception as error:
                log.exception("generation failed")
                job.loop.call_soon_threadsafe(_settle, job.future, None, error)
            else:
                job.loop.call_soon_threadsafe(_settle, job.future, response, None)
            finally:
                self._metrics.running_rows.set(0)

    def _serve(self, job: Job) -> pb.GenerateResponse:
        started = time.monotonic()
        png = self._generate(job.request.prompt, job.width, job.height, job.steps, job.seed)
        finished = time.monotonic()
        response = pb.GenerateResponse(
            request_id=job.request.request_id,
            timings=pb.Timings(
                queued_seconds=started - job.accepted_at,
                compute_seconds=finished - started,
                total_seconds=finished - job.accepted_at,
            ),
            batch_size=1,
            mean_batch_size=1.0,
            model=self._model_name,
        )
        response.images.add(
            data=png, mime_type="image/png", width=job.width, height=job.height, seed=job.seed
        )
        return response

    def _generate(self, prompt: str, width: int, height: int, steps: int, seed: int) -> bytes:
        def count_step(_pipe: Any, _step: int, _timestep: Any, tensors: dict[str, Any]) -> Any:
            self._metrics.batch_size.observe(1)
            return tensors

        assert self._pipe is not None
        image = self._pipe(
            prompt,
            true_cfg_scale=1.0,
            height=height,
            width=width,
            num_inference_steps=steps,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="pil",
            callback_on_step_end=count_step,
        ).images[0]
        buffer = io.BytesIO()
        # The real server's PNG setting, so the two differ in batching, not in zlib effort.
        image.save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue()


def _settle(
    future: asyncio.Future[pb.GenerateResponse],
    response: pb.GenerateResponse | None,
    error: BaseException | None,
) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        assert response is not None
        future.set_result(response)


class NaiveService(pb_grpc.ImageGenerationServicer):
    def __init__(self, worker: Worker, metrics: Metrics, args: argparse.Namespace) -> None:
        self._worker = worker
        self._metrics = metrics
        self._args = args

    async def Generate(self, request: pb.GenerateRequest, context: Any) -> pb.GenerateResponse:
        args = self._args
        width = request.width or args.default_width
        height = request.height or args.default_height
        steps = request.num_inference_steps or args.default_steps
        for field, value in (("width", width), ("height", height)):
            if value <= 0 or value % SIZE_MULTIPLE:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{field}: {value} is not a positive multiple of {SIZE_MULTIPLE}",
                )
        if steps < 1:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "num_inference_steps: < 1")
        if args.max_queue_size and self._worker.jobs.qsize() >= args.max_queue_size:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "queue full")
        loop = asyncio.get_running_loop()
        job = Job(
            request=request,
            width=width,
            height=height,
            steps=steps,
            seed=request.seed if request.HasField("seed") else 0,
            loop=loop,
            future=loop.create_future(),
            accepted_at=time.monotonic(),
        )
        self._worker.jobs.put(job)
        self._metrics.pending.set(self._worker.jobs.qsize())
        try:
            return await job.future
        finally:
            job.future.cancel()  # no-op once settled; a queued job is then skipped


async def serve(args: argparse.Namespace) -> int:
    metrics = Metrics()
    metrics_server, _thread = start_http_server(
        args.metrics_port, addr=args.host, registry=metrics.registry
    )
    health = health_aio.HealthServicer()
    for service in ("", SERVICE_NAME):
        await health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    worker = Worker(args, metrics)

    server = grpc.aio.server()
    # The generated base answers UNIMPLEMENTED for the RPCs the naive server leaves out.
    servicer = NaiveService(worker, metrics, args)  # type: ignore[abstract]
    pb_grpc.add_ImageGenerationServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    await server.start()
    log.info(
        "gRPC on %s:%d, metrics on %s:%d", args.host, port, args.host, metrics_server.server_port
    )

    loop = asyncio.get_running_loop()
    ready, failed = asyncio.Event(), asyncio.Event()

    def work() -> None:
        try:
            worker.run(lambda: loop.call_soon_threadsafe(ready.set))
        except BaseException:
            log.exception("worker failed")
            loop.call_soon_threadsafe(failed.set)

    threading.Thread(target=work, name="worker", daemon=True).start()
    await asyncio.wait(
        [asyncio.ensure_future(ready.wait()), asyncio.ensure_future(failed.wait())],
        return_when=asyncio.FIRST_COMPLETED,
    )
    if failed.is_set():
        await server.stop(grace=0)
        return 1
    for service in ("", SERVICE_NAME):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info("SERVING")

    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await health.enter_graceful_shutdown()
    await server.stop(grace=2.0)
    worker.jobs.put(None)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="diffusers-format Qwen-Image directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = any free port")
    parser.add_argument("--metrics-port", type=int, default=0, help="0 = any free port")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument(
        "--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16")
    )
    parser.add_argument("--torch-threads", type=int, default=0, help="0 = torch's default")
    parser.add_argument("--max-queue-size", type=int, default=0, help="0 = unbounded")
    parser.add_argument("--default-width", type=int, default=256)
    parser.add_argument("--default-height", type=int, default=256)
    parser.add_argument("--default-steps", type=int, default=8)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return asyncio.run(serve(args))
