"""Building the engine at start-up, on the engine thread, in this order: load the model, set up
its device, build the engine, compile the transformer, derive the request limits, load the
preloaded adapters, and (CUDA only) probe memory for the batch and VAE-call limits. The probes
themselves are in `probes`; `row_limit` is what the batcher later asks per batch key."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..base.adapter_files import AdapterDirectory, AdapterFile
from ..base.config import Settings
from ..base.limits import RequestLimits
from ..base.metrics import Metrics
from ..base.types import BatchKey, ModelDescription
from ..base.variants import Variant
from .acceleration import TransformerRunner, configure_device
from .denoise import FaultInjection
from .engine import Engine
from .memory import MemoryBudget, images_that_fit
from .model import LoadedModel, load_model
from .probes import precompile, probe_memory, probe_sizes
from .prompts import PromptTokenizer


@dataclass(slots=True)
class EngineSetup:
    """What start-up learned. The engine thread builds it; the API edge reads it once, on the
    event loop, after the warm-up (`api.server`)."""

    engine: Engine
    limits: RequestLimits  # what a request may ask for on this model
    count_tokens: Callable[[str], int]  # a prompt's tokens as the text encoder sees them
    description: ModelDescription  # the model's static facts, for GetServerInfo
    preloaded: list[AdapterFile] = field(default_factory=list)  # `preload_adapters`, loaded
    preloaded_parameters: int = 0  # adapter parameters resident after the preloads
    memory: MemoryBudget | None = None  # None off CUDA or with the probe off
    probed: list[tuple[int, int, int]] = field(default_factory=list)  # width, height, max rows
    variants: list[Variant] = field(default_factory=list)  # `variants`, loaded; empty = none


def build_engine(
    settings: Settings,
    adapters: AdapterDirectory,
    metrics: Metrics,
) -> EngineSetup:
    """Everything the server needs from the model; raises on any misconfiguration."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    started = time.perf_counter()
    model = _load_onto_device(settings)
    metrics.load_seconds.set(time.perf_counter() - started)
    engine = _new_engine(settings, model)
    # Before compiling: the variants' LoRAs wrap the layers they target.
    variants = engine.variants.load(
        settings.variants,
        settings.adapter_dir,
        engine.adapters,
        engine.latent_shape(settings.default_width, settings.default_height).seq_len,
        settings.max_steps,
    )
    takes_adapters = settings.adapter_dir or settings.preload_adapters
    if settings.compile != "off" and (takes_adapters or any(v.loras for v in settings.variants)):
        engine.adapters.wrap_all()  # before compiling: loading adapters then changes no module
    metrics.compile_seconds.set(precompile(engine, settings.default_width, settings.default_height))
    setup = _describe(settings, engine, variants)
    for name in settings.preload_adapters:
        file = adapters.describe(name)
        setup.preloaded_parameters = engine.adapters.load(name, file.path)
        setup.preloaded.append(file)
    if settings.memory_probe and model.device.type == "cuda":
        started = time.perf_counter()
        _limit_to_memory(settings, setup, metrics)
        metrics.memory_probe_seconds.set(time.perf_counter() - started)
    return setup


def row_limit(settings: Settings, setup: EngineSetup, key: BatchKey) -> int | None:
    """Most images per step for `key` that fit the device and, in "buckets" mode, the largest
    compiled batch (a CFG image is two rows); None = no bound known."""
    runner = setup.engine.runner
    fitting_rows = runner.largest_call
    if setup.memory is not None:
        fitting_rows = setup.memory.max_rows(
            setup.engine.tokens_per_row(key.width, key.height, key.references),
            cap=fitting_rows or runner.bucket(2 * settings.max_batch_size),
        )
    if fitting_rows is None:
        return None
    return images_that_fit(
        fitting_rows, settings.max_batch_size, 2 if key.cfg else 1, runner.bucket
    )


def _load_onto_device(settings: Settings) -> LoadedModel:
    """The model, on its device, with the device's math settings and attention backend."""
    model = load_model(
        settings.model,
        device=settings.device,
        dtype=settings.dtype,
        scheduler_preset=settings.scheduler_preset,
        loras=settings.lora,
        fuse_lora=settings.fuse_lora,
    )
    if model.device.type == "cuda":
        torch.cuda.set_device(model.device)
    configure_device(model.device, model.pipeline.transformer, settings.attention_backend)
    return model


def _new_engine(settings: Settings, model: LoadedModel) -> Engine:
    """The engine as the settings configure it: limits, faults, compile mode, VAE tiling."""
    transformer = model.pipeline.transformer
    return Engine(
        model,
        settings.prompt_cache_size,
        settings.max_prompt_tokens,
        FaultInjection(
            settings.fault_injection_request_marker,
            settings.fault_injection_oom_rows,
            settings.fault_injection_stage,
        ),
        TransformerRunner.build(
            transformer, settings.compile, settings.compile_buckets, settings.compile_scope
        ),
        settings.vae_tiling_min_pixels,
        settings.max_negative_prompt_tokens,
    )


def _describe(settings: Settings, engine: Engine, variants: list[Variant]) -> EngineSetup:
    """The setup's model facts and request limits; with variants, the steps a request may
    take are the widest of their ranges, and the scheduler preset is the default variant's.

    Raises:
        ValueError: a limit does not suit this model (the message names the setting).
    """
    model = engine.model
    min_steps = engine.min_steps(settings.default_width, settings.default_height)
    preset: str = settings.scheduler_preset
    if variants:
        min_steps = min(variant.min_steps for variant in variants)
        preset = next(variant for variant in variants if variant.is_default).scheduler_preset
    return EngineSetup(
        engine=engine,
        limits=RequestLimits.from_settings(
            settings, model.size_multiple, min_steps, model.max_reference_images
        ),
        count_tokens=PromptTokenizer(model.pipeline).count,
        description=ModelDescription(
            name=settings.model,
            device=str(model.device),
            dtype=str(model.dtype).removeprefix("torch."),
            scheduler_preset=preset,
            fused_adapters=tuple(model.fused_loras),
            pipeline=model.kind,
        ),
        variants=variants,
    )


def _limit_to_memory(settings: Settings, setup: EngineSetup, metrics: Metrics) -> None:
    """Probes what fits on the device, holds VAE calls to it and reports each probed size's
    batch limit."""
    sizes = probe_sizes(settings)
    setup.memory = probe_memory(setup.engine, settings, sizes)
    setup.engine.limit_vae_calls(setup.memory, settings.max_batch_size)
    for width, height in sizes:
        rows = row_limit(settings, setup, BatchKey(height=height, width=width, cfg=False)) or 0
        setup.probed.append((width, height, rows))
        metrics.max_batch_size.labels(resolution=f"{width}x{height}").set(rows)
