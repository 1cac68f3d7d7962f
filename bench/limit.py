"""The limit: the engine alone, no server, no gRPC, at each batch size.

It drives the server's `Engine` exactly as the batcher does (`add` a batch of requests,
`step` until they finish) in this process, one batch at a time. A batch's time runs from `add`
(text encoding) to its decoded images; PNG encoding and the RPC are left out on purpose: they are
part of the serving overhead the servers are measured against.
"""

from __future__ import annotations

import itertools
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .machine import BUSY_CORES, CpuMeter
from .workloads import RequestClass, reference_pictures

PROMPT_CACHE_SIZE = 256  # the server's defaults
MAX_PROMPT_TOKENS = 512
MEMORY_RESERVE_FRACTION = 0.1
MAX_DECODE_ROWS = 64  # above any batch size the benchmarks run


class BatchTooLarge(RuntimeError):
    """A batch did not fit in device memory."""


@dataclass(slots=True)
class BatchTiming:
    """One batch run to completion."""

    seconds: float  # add -> decoded images
    stage_seconds: dict[str, float]  # text_encode / denoise_step (all steps) / vae_decode
    step_seconds: list[float]  # each denoising step


@dataclass(slots=True)
class LimitPoint:
    """Engine throughput for one request class at one batch size."""

    label: str  # request class, e.g. "256x256/8"
    batch_size: int
    images_per_s: float
    ms_per_step: float  # mean wall time of one denoising step of the whole batch
    stage_share: dict[str, float]  # fraction of batch time per stage
    batch_seconds: list[float] = field(default_factory=list)  # measured batches (warm-up excluded)
    background_cpu: float = 0.0  # cores other processes used meanwhile


@dataclass(slots=True)
class LimitResult:
    sweep: list[LimitPoint]  # the main resolution at every batch size
    best_batch_size: int
    limit_ips: float  # best images/s of the sweep: the number servers are compared with
    latency_s: float  # engine alone, batch 1: median time of one request
    mix: list[LimitPoint]  # each class of the mix at best_batch_size
    mix_limit_ips: float | None  # equal numbers of images of each mix class, at best_batch_size

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


class EngineBench:
    """Loads the model once and times batches through the engine."""

    def __init__(
        self,
        model_dir: Path,
        device: str,
        dtype: str,
        torch_threads: int,
        attention_backend: str | None = None,
        decode_sizes: Sequence[tuple[int, int]] = (),
    ) -> None:
        """On CUDA, the VAE decodes of `decode_sizes` (width, height) are probed as the server
        probes them, so finished rows decode in as many images per call as fit."""
        import torch
        from imagegen_server.engine.acceleration import configure_device
        from imagegen_server.engine.engine import Engine
        from imagegen_server.engine.model import load_model

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self._model = load_model(str(model_dir), device=device, dtype=dtype)
        self._device = str(self._model.device)
        if self._model.device.type == "cuda":
            torch.cuda.set_device(self._model.device)
        # The server's device set-up (TF32, cuDNN autotuning, the attention backend).
        configure_device(self._model.device, self._model.pipeline.transformer, attention_backend)
        self._engine = Engine(self._model, PROMPT_CACHE_SIZE, MAX_PROMPT_TOKENS)
        self._ids = itertools.count()
        self._decode_budget = None
        if self._model.device.type == "cuda" and decode_sizes:
            self._decode_budget = self._probe_decodes(decode_sizes)
            self._engine.limit_vae_calls(self._decode_budget, MAX_DECODE_ROWS)

    def _probe_decodes(self, sizes: Sequence[tuple[int, int]]) -> Any:
        """The server's VAE decode probe (`imagegen_server.engine.probes`), without the step's."""
        from imagegen_server.engine.memory import MemoryBudget
        from imagegen_server.engine.probes import free_device_bytes, probe_vae_costs

        costs = probe_vae_costs(self._engine, list(sizes), ("decode",))
        return MemoryBudget(free_device_bytes(self._engine), MEMORY_RESERVE_FRACTION, (), costs)

    @property
    def device(self) -> str:
        return self._device

    def release(self) -> None:
        """Lets go of the model and its device memory, for servers that need the whole device
        (on a GPU each server holds its own copy of the model). Nothing can run after this."""
        import gc

        import torch

        del self._engine, self._model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @property
    def model(self) -> Any:
        """The loaded model (`imagegen_server.engine.model.LoadedModel`)."""
        return self._model

    def compile(
        self, mode: str, buckets: list[int], scope: str, sizes: list[tuple[int, int]]
    ) -> float:
        """Rebuilds the engine around a transformer compiled as the server's `--compile MODE
        --compile-buckets B --compile-scope S` would, from empty in-process graph caches, and
        compiles it for every (width, height) of `sizes`; returns the seconds that took.

        Compiling the blocks happens in place, so the eager transformer is gone after that
        scope: measure eager (mode "off") and the "model" scope first.
        """
        import torch
        from imagegen_server.engine.acceleration import TransformerRunner
        from imagegen_server.engine.engine import Engine
        from imagegen_server.engine.probes import precompile

        torch._dynamo.reset()
        transformer = self._model.pipeline.transformer
        runner = TransformerRunner.build(transformer, mode, buckets, scope)  # type: ignore[arg-type]
        self._engine = Engine(self._model, PROMPT_CACHE_SIZE, MAX_PROMPT_TOKENS, runner=runner)
        if self._decode_budget is not None:
            self._engine.limit_vae_calls(self._decode_budget, MAX_DECODE_ROWS)
        return sum(precompile(self._engine, width, height) for width, height in sizes)

    def prompt_tokens(self, number: int) -> int:
        """Text tokens the transformer sees for request `number`'s prompt."""
        from imagegen_server.engine.prompts import PromptTokenizer

        return PromptTokenizer(self._model.pipeline).count(_prompt(number))

    def run_batch(self, cls: RequestClass, batch_size: int) -> BatchTiming:
        """Runs `batch_size` requests of `cls` (distinct prompts and seeds) to completion."""
        from imagegen_server.base.engine_api import EngineRequest

        requests = [
            EngineRequest(str(n), self._params(cls, n)) for n in self._batch_ids(batch_size)
        ]
        group = ("limit", requests[0].request_id)
        started = time.perf_counter()
        added = self._engine.add(group, requests)
        if getattr(added, "failed", None):
            raise RuntimeError(f"engine could not encode prompts of {added.failed}")
        stages = dict(added.stage_seconds)
        steps: list[float] = []
        finished = 0
        while finished < batch_size:
            result = self._engine.step(group)
            if result.out_of_memory_rows is not None:
                # The engine split the call to survive; its timing is not this batch size's.
                for request in requests:
                    self._engine.cancel(request.request_id)
                raise BatchTooLarge(
                    f"batch {batch_size} of {cls.label} is out of device memory; "
                    f"{result.out_of_memory_rows} rows fit"
                )
            if getattr(result, "failed", None):
                raise RuntimeError(f"engine step failed for {result.failed}; see the log")
            steps.append(result.stage_seconds["denoise_step"])
            for stage, seconds in result.stage_seconds.items():
                stages[stage] = stages.get(stage, 0.0) + seconds
            finished += len(result.finished)
        return BatchTiming(time.perf_counter() - started, stages, steps)

    def measure(
        self, cls: RequestClass, batch_size: int, min_batches: int, min_seconds: float
    ) -> LimitPoint:
        """One warm-up batch (not counted), then batches until both minimums are met."""
        self.run_batch(cls, batch_size)
        timings: list[BatchTiming] = []
        while len(timings) < min_batches or sum(t.seconds for t in timings) < min_seconds:
            timings.append(self.run_batch(cls, batch_size))
        total = sum(t.seconds for t in timings)
        stage_totals: dict[str, float] = {}
        for timing in timings:
            for stage, seconds in timing.stage_seconds.items():
                stage_totals[stage] = stage_totals.get(stage, 0.0) + seconds
        steps = [seconds for timing in timings for seconds in timing.step_seconds]
        return LimitPoint(
            label=cls.label,
            batch_size=batch_size,
            images_per_s=batch_size * len(timings) / total,
            ms_per_step=1000 * statistics.fmean(steps),
            stage_share={stage: seconds / total for stage, seconds in stage_totals.items()},
            batch_seconds=[t.seconds for t in timings],
        )

    def _batch_ids(self, count: int) -> list[int]:
        return [next(self._ids) for _ in range(count)]

    @staticmethod
    def _params(request_class: RequestClass, number: int) -> Any:
        from imagegen_server.base.types import GenerationParams, OutputFormat

        return GenerationParams(
            request_id=str(number),
            prompt=_prompt(number),
            negative_prompt="",
            width=request_class.width,
            height=request_class.height,
            steps=request_class.steps,
            guidance_scale=1.0,
            seed=number,
            num_images=1,
            output_format=OutputFormat.PNG,
            output_quality=90,
            references=_references(request_class.references),
        )


def _references(count: int) -> Any:
    """The fixed reference pictures the load generators send, as the server decodes them."""
    if not count:
        return None
    import hashlib
    import io

    from imagegen_server.base.references import ReferenceImages
    from PIL import Image

    pictures = reference_pictures(count)
    images = tuple(Image.open(io.BytesIO(data)).convert("RGB") for data in pictures)
    return ReferenceImages(images, hashlib.sha256(b"".join(pictures)).hexdigest())


def _prompt(number: int) -> str:
    """Distinct prompts (each is text-encoded) of one length, 168 tokens with the random
    model's byte-level tokenizer: rows of a batch are never padded, so no call carries a mask
    (bench.attention measures what a mask costs)."""
    return f"engine request {number:06d}: lighthouse at sea"


def measure_quietly(
    bench: EngineBench,
    cls: RequestClass,
    batch_size: int,
    batches: int,
    seconds: float,
    retries: int = 2,
    progress: Callable[[str], None] = print,
) -> LimitPoint:
    """`bench.measure`, again (up to `retries` times) while other processes used more than
    BUSY_CORES of the CPU meanwhile; the fastest attempt counts (a busy machine only slows)."""
    attempts: list[LimitPoint] = []
    while len(attempts) <= retries:
        meter = CpuMeter([os.getpid()])
        meter.start()
        measured = bench.measure(cls, batch_size, batches, seconds)
        measured.background_cpu = meter.stop().background
        progress(
            f"  engine {measured.label} batch {batch_size}: {measured.images_per_s:.3f} img/s,"
            f" {measured.ms_per_step:.1f} ms/step ({len(measured.batch_seconds)} batches,"
            f" other CPU {measured.background_cpu:.2f})"
        )
        attempts.append(measured)
        if measured.background_cpu <= BUSY_CORES:
            break
        if len(attempts) <= retries:
            progress("  other processes were busy: measuring again")
    return max(attempts, key=lambda attempt: attempt.images_per_s)


def measure_limit(
    bench: EngineBench,
    main: RequestClass,
    batch_sizes: list[int],
    mix: list[RequestClass],
    min_batches: int,
    min_seconds: float,
    latency_samples: int,
    retries: int = 2,
    progress: Callable[[str], None] = print,
) -> LimitResult:
    """Sweeps `batch_sizes` for `main`, then times each `mix` class at the best batch size.

    A point measured while other processes used more than BUSY_CORES of the CPU is measured
    again, up to `retries` times (see `measure_quietly`).
    """

    def point(cls: RequestClass, batch_size: int, batches: int, seconds: float) -> LimitPoint:
        return measure_quietly(bench, cls, batch_size, batches, seconds, retries, progress)

    sweep = []
    for batch_size in batch_sizes:
        batches = max(min_batches, latency_samples) if batch_size == 1 else min_batches
        sweep.append(point(main, batch_size, batches, min_seconds))
    best = max(sweep, key=lambda p: p.images_per_s)
    single = next((p for p in sweep if p.batch_size == 1), None)
    if single is None:  # the latency needs batch 1 even when the sweep skips it
        single = point(main, 1, latency_samples, 0.0)
    # The main class at the best batch size is already measured; the others get one batch less.
    mix_points = [
        best if cls == main else point(cls, best.batch_size, max(1, min_batches - 1), 0.0)
        for cls in mix
    ]
    mix_limit = None
    if mix_points:
        # Equal numbers of images of each class: seconds per image average over the classes.
        mix_limit = 1 / statistics.fmean(1 / p.images_per_s for p in mix_points)
    return LimitResult(
        sweep=sweep,
        best_batch_size=best.batch_size,
        limit_ips=best.images_per_s,
        latency_s=statistics.median(single.batch_seconds),
        mix=mix_points,
        mix_limit_ips=mix_limit,
    )


def adjacent_latency(bench: EngineBench, cls: RequestClass, samples: int) -> list[float]:
    """Batch-1 request times, taken right next to a server run (the machine's speed drifts)."""
    return [bench.run_batch(cls, 1).seconds for _ in range(samples)]


def adjacent_throughput(
    bench: EngineBench, cls: RequestClass, batch_size: int, batches: int
) -> list[float]:
    """Batch times at `batch_size`, taken right next to a server run."""
    return [bench.run_batch(cls, batch_size).seconds for _ in range(batches)]
