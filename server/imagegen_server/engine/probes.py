"""Start-up probes of a built engine: compiling the transformer before serving, and measuring
(CUDA only) what one denoising call, VAE decode and VAE encode take in device memory.

Each memory probe runs the real call on zeros and reads the allocator's peak above what was
allocated before it; `memory.probe_costs` turns two such peaks into a cost per row and
`memory.MemoryBudget` into limits. `startup.build_engine` runs them in that order: compile first
(compiled kernels are what serving runs), then the memory probes.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..base.config import Settings
from .engine import Engine
from .memory import MemoryBudget, OutOfMemory, RowCost, probe_costs


def precompile(engine: Engine, width: int, height: int) -> float:
    """Compiles the transformer for `width` x `height` before serving (and, when adapters may
    come, its variant with adapters active: lora.py); returns seconds."""
    transformer = engine.model.pipeline.transformer
    shape = engine.latent_shape(width, height)

    def compile_shapes() -> float:
        return engine.runner.precompile(
            shape.seq_len,
            shape.channels * 4,
            transformer.config.joint_attention_dim,
            shape.rope_shape,
            engine.max_text_tokens,
            engine.model.dtype,
            engine.model.device,
        )

    seconds = compile_shapes()
    if engine.adapters.all_wrapped:
        with engine.adapters.as_if_active():
            seconds += compile_shapes()
        # Once a graph broke at the adapters' deltas, Dynamo runs each wrapped layer as a
        # frame of its own, which calls without adapters would compile again while serving:
        # the shapes run once more with adapters off (no new block graphs, only those).
        seconds += compile_shapes()
    return seconds


def probe_sizes(settings: Settings) -> list[tuple[int, int]]:
    """The (width, height) sizes the memory probe measures: `memory_probe_sizes`, else the
    default size and the largest one allowed (the default again when the largest exceeds
    `max_pixels`)."""
    sizes = [_parse_size(text) for text in settings.memory_probe_sizes] or [
        (settings.default_width, settings.default_height),
        (settings.max_width, settings.max_height)
        if settings.max_width * settings.max_height <= settings.max_pixels
        else (settings.default_width, settings.default_height),
    ]
    return list(dict.fromkeys(sizes))


def probe_memory(engine: Engine, settings: Settings, sizes: list[tuple[int, int]]) -> MemoryBudget:
    """What fits on the engine's CUDA device: the step's and the VAE's costs at `sizes`, and the
    memory left free once the step probes are done.

    Raises:
        RuntimeError: one row of some call does not fit at one of `sizes`.
    """
    costs = probe_costs(
        functools.partial(peak_step_bytes, engine),
        [(w, h, engine.tokens_per_row(w, h)) for w, h in sizes],
        engine.runner.probe_rows(),
    )
    pixels_per_token = (engine.model.vae_scale_factor * 2) ** 2  # latents are packed 2x2
    return MemoryBudget(
        free_device_bytes(engine),
        settings.memory_reserve_fraction,
        costs,
        probe_vae_costs(engine, sizes, ("decode", "encode")),
        vae_tiling_min_tokens=-(-settings.vae_tiling_min_pixels // pixels_per_token),
    )


def probe_vae_costs(
    engine: Engine, sizes: list[tuple[int, int]], kinds: tuple[str, ...]
) -> dict[str, tuple[RowCost, ...]]:
    """What VAE calls of each kind ("decode", "encode") cost per image at each (width, height)."""
    image_sizes = [(w, h, engine.image_tokens(w, h)) for w, h in sizes]
    peaks = {"decode": peak_decode_bytes, "encode": peak_encode_bytes}
    return {
        kind: probe_costs(functools.partial(peaks[kind], engine), image_sizes, what=kind)
        for kind in kinds
    }


def free_device_bytes(engine: Engine) -> int:
    """Memory free on the engine's CUDA device, once the probes' cached blocks are released
    (`mem_get_info` counts them as used)."""
    torch.cuda.empty_cache()
    free_bytes, _total = torch.cuda.mem_get_info(engine.model.device)
    return int(free_bytes)


@torch.inference_mode()
def peak_step_bytes(engine: Engine, width: int, height: int, rows: int) -> int:
    """CUDA memory a denoising call of `rows` rows with the longest text (prompt or negative)
    takes above what is allocated now, every row carrying every variant's LoRAs (their deltas'
    activations count).

    Raises:
        memory.OutOfMemory: the call does not fit.
    """
    model = engine.model
    shape = engine.latent_shape(width, height)
    dim = model.pipeline.transformer.config.joint_attention_dim
    text = engine.max_text_tokens
    loras = engine.variants.all_loras()
    with _peak_memory(model.device) as peak, engine.adapters.applied([loras] * rows):
        engine.runner(
            _zero_latents(engine, width, height, rows),
            torch.full((rows,), 0.5, dtype=model.dtype, device=model.device),
            torch.zeros(rows, text, dim, dtype=model.dtype, device=model.device),
            torch.ones(rows, text, dtype=torch.long, device=model.device),
            [shape.rope_shape],
        )
    return peak.bytes


@torch.inference_mode()
def peak_decode_bytes(engine: Engine, width: int, height: int, rows: int) -> int:
    """CUDA memory one VAE decode of `rows` images takes above what is allocated now.

    Raises:
        memory.OutOfMemory: the decode does not fit.
    """
    with _peak_memory(engine.model.device) as peak:
        latents = _zero_latents(engine, width, height, rows)
        engine.decoder.images(latents, height, width, [False] * rows)
    return peak.bytes


@torch.inference_mode()
def peak_encode_bytes(engine: Engine, width: int, height: int, rows: int) -> int:
    """CUDA memory one VAE encode of `rows` init images takes above what is allocated now.

    Raises:
        memory.OutOfMemory: the encode does not fit.
    """
    model = engine.model
    with _peak_memory(model.device) as peak:
        pixels = torch.zeros(rows, 3, 1, height, width, dtype=model.dtype)
        engine.init_images.posteriors(pixels.to(model.device), height, width)
    return peak.bytes


def _zero_latents(engine: Engine, width: int, height: int, rows: int) -> torch.Tensor:
    """Packed latents of `rows` images at this size, all zeros, on the engine's device."""
    shape = engine.latent_shape(width, height)
    model = engine.model
    return torch.zeros(
        rows, shape.seq_len, shape.channels * 4, dtype=model.dtype, device=model.device
    )


@dataclass(slots=True)
class _Peak:
    bytes: int = 0  # set when the probed block ends


@contextlib.contextmanager
def _peak_memory(device: torch.device) -> Iterator[_Peak]:
    """The peak CUDA memory the block allocates above what was allocated before it; an
    out-of-memory error in it becomes memory.OutOfMemory."""
    peak = _Peak()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    try:
        yield peak
    except torch.OutOfMemoryError as error:
        raise OutOfMemory(str(error)) from error
    peak.bytes = int(torch.cuda.max_memory_allocated(device) - before)


def _parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    try:
        return int(width), int(height)
    except ValueError:
        raise ValueError(f"memory_probe_sizes: {text!r} is not WIDTHxHEIGHT") from None
