"""Factory helpers shared by the tests: a real server on 127.0.0.1 and stream watchers."""

from __future__ import annotations

import asyncio
import io
import queue
import threading
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from imagegen_client import Completed, ImageGenClient, ProgressEvent, Queued, Started, Step
from prometheus_client.parser import text_string_to_metric_families

# Small, fast limits for the tiny model: 64x64 images, 4 steps by default.
TEST_SETTINGS: dict[str, Any] = {
    "host": "127.0.0.1",
    "port": 0,
    "metrics_port": 0,
    "min_width": 32,
    "min_height": 32,
    "max_width": 256,
    "max_height": 256,
    "default_width": 64,
    "default_height": 64,
    "max_steps": 16,
    "default_steps": 4,
    "max_queue_delay_ms": 0.0,
    "torch_threads": 2,
}
# Pixel tests run under the server's default row selection (`cost`), the one users get. Tests
# that assert which rows shared a step (batch sizes, step counts) ask for this instead, since
# under `cost` that depends on measured step times.
ALL_ROWS: dict[str, Any] = {"row_selection": "all"}
EVENT_TIMEOUT_S = 60.0
# A bound on start-up, not a timing: compiling the transformer takes over a minute on a busy
# 2-core CI machine.
START_TIMEOUT_S = 600.0
# The determinism contract (docs/architecture.md, "Determinism"): max abs pixel difference.
PIXEL_TOLERANCE = 1e-5


@dataclass
class RunningServer:
    """An ImageGenServer on its own event loop in a background thread."""

    server: Any  # imagegen_server.api.server.ImageGenServer
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    clients: list[ImageGenClient] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def batcher(self) -> Any:
        return self.server.batcher

    def client(self, **options: Any) -> ImageGenClient:
        client = ImageGenClient(self.target, **options)
        self.clients.append(client)
        return client

    def metrics(self) -> dict[str, float]:
        """Every sample on /metrics, keyed like `name{label="value",...}`."""
        url = f"http://127.0.0.1:{self.server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

    def run(self, coroutine: Any, timeout: float = EVENT_TIMEOUT_S) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        self.run(self.server.stop_now())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def start_server(
    model_dir: Path,
    wait_ready: bool = True,
    step_budget: int | None = None,
    tracing: Any = None,
    **overrides: Any,
) -> RunningServer:
    """Starts a server whose engine then runs at most `step_budget` steps until released.

    With `wait_ready=False` the budget applies from the start, warm-up included, so `0` keeps the
    server NOT_SERVING until the test releases it.
    """
    from imagegen_server.api.server import ImageGenServer
    from imagegen_server.base.config import load_settings

    settings = load_settings(model=str(model_dir), **{**TEST_SETTINGS, **overrides})
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-server", daemon=True)
    thread.start()

    async def create() -> ImageGenServer:
        server = ImageGenServer(settings, tracing)
        if not wait_ready:
            server.batcher.set_step_budget(step_budget)
        await server.start()
        return server

    running = RunningServer(
        asyncio.run_coroutine_threadsafe(create(), loop).result(60), loop, thread
    )
    if wait_ready:
        try:
            ready = running.run(running.server.wait_ready(), timeout=START_TIMEOUT_S)
        except TimeoutError:
            ready = False
        if not ready:
            running.stop()
            raise RuntimeError(
                f"test server not ready in {START_TIMEOUT_S:.0f} s or failed; see the log"
            )
        running.batcher.set_step_budget(step_budget)
    return running


class StreamWatcher:
    """Consumes one StreamProgress call in a thread; tests wait for its events, never sleep."""

    def __init__(self, client: ImageGenClient, prompt: str, **options: Any) -> None:
        self.events: queue.Queue[ProgressEvent | BaseException] = queue.Queue()
        self.seen: list[ProgressEvent] = []
        self._thread = threading.Thread(
            target=self._consume, args=(client, prompt, options), daemon=True
        )
        self._thread.start()

    def _consume(self, client: ImageGenClient, prompt: str, options: dict[str, Any]) -> None:
        try:
            for event in client.stream(prompt, **options):
                self.events.put(event)
        except BaseException as error:  # delivered to the test thread
            self.events.put(error)

    def next(self, timeout: float = EVENT_TIMEOUT_S) -> ProgressEvent:
        item = self.events.get(timeout=timeout)
        if isinstance(item, BaseException):
            raise item
        self.seen.append(item)
        return item

    def wait_for(
        self, predicate: Callable[[ProgressEvent], bool], timeout: float = EVENT_TIMEOUT_S
    ) -> ProgressEvent:
        while True:
            event = self.next(timeout)
            if predicate(event):
                return event

    def queued(self) -> Queued:
        event = self.wait_for(lambda e: isinstance(e, Queued))
        assert isinstance(event, Queued)
        return event

    def started(self) -> Started:
        event = self.wait_for(lambda e: isinstance(e, Started))
        assert isinstance(event, Started)
        return event

    def step(self, number: int) -> Step:
        event = self.wait_for(lambda e: isinstance(e, Step) and e.step >= number)
        assert isinstance(event, Step) and event.step == number, (
            f"expected step {number}, got {event}"
        )
        return event

    def completed(self) -> Completed:
        event = self.wait_for(lambda e: isinstance(e, Completed))
        assert isinstance(event, Completed)
        return event

    def error(self) -> grpc.RpcError:
        while True:
            item = self.events.get(timeout=EVENT_TIMEOUT_S)
            if isinstance(item, grpc.RpcError):
                return item
            if isinstance(item, BaseException):
                raise item
            self.seen.append(item)

    def join(self) -> None:
        """Waits for the call to end; a call still running after EVENT_TIMEOUT_S has hung."""
        self._thread.join(EVENT_TIMEOUT_S)
        assert not self._thread.is_alive(), "the stream call hung"


def run_together(server: RunningServer, prompts: list[str], **options: Any) -> list[Any]:
    """Queues one request per prompt (seed = its index) while the engine is held, then releases
    it, so they all start in the same step; returns their GenerationResults in order."""
    client = server.client()
    server.batcher.set_step_budget(0)
    watchers = [
        StreamWatcher(client, prompt, seed=index, **options) for index, prompt in enumerate(prompts)
    ]
    for watcher in watchers:
        watcher.queued()
    server.batcher.set_step_budget(None)
    return [watcher.completed().result for watcher in watchers]


def pixels(result: Any, index: int = 0) -> np.ndarray:
    """Float32 pixels of an NPY image from a GenerationResult."""
    return np.asarray(result.images[index].to_numpy(), dtype=np.float32)


def assert_same_image(
    actual: np.ndarray, expected: np.ndarray, tolerance: float = PIXEL_TOLERANCE
) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    difference = float(np.abs(actual.astype(np.float32) - expected.astype(np.float32)).max())
    assert difference <= tolerance, f"max pixel difference {difference:.2e} > {tolerance:.0e}"


def png(image: Any) -> bytes:
    """A PIL image as PNG bytes (an init or mask image for a request)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pipeline_image(
    pipeline: Any,
    prompt: str,
    seed: int,
    *,
    width: int = 64,
    height: int = 64,
    steps: int = 4,
    negative_prompt: str | None = None,
    guidance: float = 1.0,
    **inputs: Any,
) -> np.ndarray:
    """A diffusers pipeline's `__call__` with the server's conventions (a CPU generator seeded
    with the image's seed; float pixels in [0, 1]): the fidelity reference."""
    import torch

    output = pipeline(
        prompt,
        negative_prompt=negative_prompt,
        true_cfg_scale=guidance,
        width=width,
        height=height,
        num_inference_steps=steps,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
        **inputs,
    )
    return np.asarray(output.images[0], dtype=np.float32)


def engine_params(
    request_id: str, seed: int = 0, num_images: int = 1, steps: int = 4, priority: int = 1
) -> Any:
    """A valid `GenerationParams` at the test size (64x64, 4 steps by default) for driving the
    engine or the batcher directly; NPY output keeps the pixels exact."""
    from imagegen_server.base.types import GenerationParams, OutputFormat

    return GenerationParams(
        request_id=request_id,
        prompt=f"prompt {seed}",
        negative_prompt="",
        width=64,
        height=64,
        steps=steps,
        guidance_scale=1.0,
        seed=seed,
        num_images=num_images,
        output_format=OutputFormat.NPY,
        output_quality=90,
        priority=priority,
    )


def scheduled_request(
    ticket: str,
    key: Any = "A",
    at: float = 0.0,
    steps: int = 4,
    rows: int = 1,
    priority: int = 1,
    deadline: float | None = None,
) -> Any:
    """A `Request` for driving the scheduler directly: `ticket` doubles as the client's id, and
    `key` is any hashable (the scheduler only compares keys)."""
    from imagegen_server.base.request import Request

    params = engine_params(ticket, num_images=rows, steps=steps, priority=priority)
    return Request(ticket, params, key, arrival=at, deadline=deadline)


def variants_config(adapters: Path) -> list[dict[str, Any]]:
    """Three variants over the tiny model's LoRA files: the base model with CFG, a
    "lightning-ish" one (a Kohya LoRA by path, the Lightning scheduler settings, 2 steps) and a
    softened style (a PEFT LoRA by adapter name at scale 0.5), marked as the default."""
    return [
        {
            "name": "base",
            "default_steps": 4,
            "default_guidance_scale": 4.0,
            "min_steps": 2,
            "max_steps": 8,
        },
        {
            "name": "fast",
            "loras": [f"{adapters}/ink.safetensors@1.0"],
            "scheduler_preset": "lightning",
            "default_steps": 2,
            "min_steps": 2,
            "max_steps": 3,
        },
        {
            "name": "soft",
            "loras": [{"file": "pastel", "scale": 0.5}],
            "default_steps": 3,
            "default_guidance_scale": 3.0,
            "max_steps": 6,
            "default": True,
        },
    ]
