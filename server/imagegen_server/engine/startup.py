"""Building the engine at start-up, on the engine thread: load the model, set up the device,
compile, probe memory, load preloaded adapters, and derive the request limits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..base.adapter_files import AdapterDirectory, AdapterFile
from ..base.config import Settings
from ..base.limits import RequestLimits
from ..base.metrics import Metrics
from ..base.types import BatchKey, ModelDescription
from .acceleration import TransformerRunner, configure_device
from .denoise import FaultInjection
from .engine import Engine
from .memory import MemoryBudget, RowCost, images_that_fit, probe_costs
from .model import load_model
from .prompts import PromptTokenizer


@dataclass(slots=True)
class EngineSetup:
    """What start-up learned. The engine thread builds it; the API edge reads it once, on the
    event loop, after the warm-up (`api.server`)."""

    engine: Engine
    limits: RequestLimits  # what a request may ask for on this model
    count_tokens: Callable[[str], int]  # a prompt's tokens as the text encoder sees them
    description: ModelDescription
    preloaded: list[AdapterFile] = field(default_factory=list)
    preloaded_parameters: int = 0
    memory: MemoryBudget | None = None  # None off CUDA or with the probe off
    probed: list[tuple[int, int, int]] = field(default_factory=list)  # width, height, max rows


def build_engine(
    settings: Settings,
    adapters: AdapterDirectory,
    metrics: Metrics,
) -> EngineSetup:
    """Everything the server needs from the model; raises on any misconfiguration."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
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
    transformer = model.pipeline.transformer
    configure_device(model.device, transformer, settings.attention_backend)
    engine = Engine(
        model,
        settings.prompt_cache_size,
        settings.max_prompt_tokens,
        FaultInjection(settings.fault_injection_request_marker, settings.fault_injection_oom_rows),
        TransformerRunner.build(
            transformer, settings.compile, settings.compile_buckets, settings.compile_scope
        ),
        settings.vae_tiling_min_pixels,
        settings.max_negative_prompt_tokens,
    )
    if settings.compile != "off" and (settings.adapter_dir or settings.preload_adapters):
        engine.adapters.wrap_all()  # before compiling: loading adapters then changes no module
    metrics.compile_seconds.set(engine.precompile(settings.default_width, settings.default_height))
    min_steps = engine.min_steps(settings.default_width, settings.default_height)
    # Fails fast, with the setting's name, if the limits do not suit this model.
    setup = EngineSetup(
        engine=engine,
        limits=RequestLimits.from_settings(settings, model.size_multiple, min_steps),
        count_tokens=PromptTokenizer(model.pipeline).count,
        description=ModelDescription(
            name=settings.model,
            device=str(model.device),
            dtype=str(model.dtype).removeprefix("torch."),
            scheduler_preset=settings.scheduler_preset,
            fused_adapters=tuple(model.fused_loras),
        ),
    )
    for name in settings.preload_adapters:
        file = adapters.describe(name)
        setup.preloaded_parameters = engine.adapters.load(name, file.path)
        setup.preloaded.append(file)
    if settings.memory_probe and model.device.type == "cuda":
        _probe_memory(settings, setup, metrics)
    return setup


def row_limit(settings: Settings, setup: EngineSetup, key: BatchKey) -> int | None:
    """Most images per step for `key` that fit the device and, in "buckets" mode, the largest
    compiled batch (a CFG image is two rows); None = no bound known."""
    runner = setup.engine.runner
    fitting_rows = runner.largest_call
    if setup.memory is not None:
        fitting_rows = setup.memory.max_rows(
            setup.engine.tokens_per_row(key.width, key.height),
            cap=fitting_rows or runner.bucket(2 * settings.max_batch_size),
        )
    if fitting_rows is None:
        return None
    return images_that_fit(
        fitting_rows, settings.max_batch_size, 2 if key.cfg else 1, runner.bucket
    )


def _probe_memory(settings: Settings, setup: EngineSetup, metrics: Metrics) -> None:
    engine = setup.engine
    sizes = [_parse_size(text) for text in settings.memory_probe_sizes] or [
        (settings.default_width, settings.default_height),
        (settings.max_width, settings.max_height)
        if settings.max_width * settings.max_height <= settings.max_pixels
        else (settings.default_width, settings.default_height),
    ]
    sizes = list(dict.fromkeys(sizes))
    costs = probe_costs(
        engine.peak_step_bytes,
        [(w, h, engine.tokens_per_row(w, h)) for w, h in sizes],
        engine.runner.probe_rows(),
    )
    pixels_per_token = (engine.model.vae_scale_factor * 2) ** 2  # latents are packed 2x2
    setup.memory = MemoryBudget(
        free_device_bytes(engine),
        settings.memory_reserve_fraction,
        costs,
        probe_vae_costs(engine, sizes, ("decode", "encode")),
        vae_tiling_min_tokens=-(-settings.vae_tiling_min_pixels // pixels_per_token),
    )
    engine.limit_vae_calls(setup.memory, settings.max_batch_size)
    for width, height in sizes:
        rows = row_limit(settings, setup, BatchKey(height=height, width=width, cfg=False)) or 0
        setup.probed.append((width, height, rows))
        metrics.max_batch_size.labels(resolution=f"{width}x{height}").set(rows)


def probe_vae_costs(
    engine: Engine, sizes: list[tuple[int, int]], kinds: tuple[str, ...]
) -> dict[str, tuple[RowCost, ...]]:
    """What VAE calls of each kind ("decode", "encode") cost per image at each (width, height)."""
    image_sizes = [(w, h, engine.image_tokens(w, h)) for w, h in sizes]
    peaks = {"decode": engine.peak_decode_bytes, "encode": engine.peak_encode_bytes}
    return {kind: probe_costs(peaks[kind], image_sizes, what=kind) for kind in kinds}


def free_device_bytes(engine: Engine) -> int:
    """Memory free on the engine's CUDA device, once the probes' cached blocks are released
    (`mem_get_info` counts them as used)."""
    torch.cuda.empty_cache()
    free_bytes, _total = torch.cuda.mem_get_info(engine.model.device)
    return int(free_bytes)


def _parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    try:
        return int(width), int(height)
    except ValueError:
        raise ValueError(f"memory_probe_sizes: {text!r} is not WIDTHxHEIGHT") from None
