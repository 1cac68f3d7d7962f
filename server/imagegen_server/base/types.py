"""Internal request and result types shared by the service, batcher, scheduler and engine.

Nothing here imports torch or generated protobuf code: the service converts protobuf messages into
these, and everything below it works on them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
from PIL.Image import Image as PILImage

from .references import ReferenceImages


class OutputFormat(enum.Enum):
    PNG = "png"
    JPEG = "jpeg"
    WEBP = "webp"
    # Lossless float32 HxWx3 array in [0, 1] (.npy), for pipelines that post-process the pixels and
    # for checking the determinism contract, which 8-bit formats cannot resolve.
    NPY = "npy"

    @property
    def mime_type(self) -> str:
        return _MIME_TYPES[self]

    @property
    def is_float(self) -> bool:
        return self is OutputFormat.NPY


_MIME_TYPES = {
    OutputFormat.PNG: "image/png",
    OutputFormat.JPEG: "image/jpeg",
    OutputFormat.WEBP: "image/webp",
    OutputFormat.NPY: "application/x-npy",
}


@dataclass(frozen=True, slots=True)
class ModelDescription:
    """Static facts about the loaded model, for GetServerInfo."""

    name: str
    device: str
    dtype: str
    scheduler_preset: str
    fused_adapters: tuple[str, ...]
    pipeline: str = "text-to-image"  # or "edit", "edit-plus" (base.references)


@dataclass(frozen=True, slots=True)
class AdapterSpec:
    name: str  # adapter name in the registry
    scale: float  # multiplier of the adapter's delta; 0 = no effect


@dataclass(frozen=True, slots=True)
class BatchKey:
    """What must be equal for rows to share one transformer call (docs/architecture.md, "The
    batch key").

    Image-to-image and inpainting rows differ only in how their latents start and in a blend
    after each step, not in the transformer call, so they share batches with text-to-image rows.
    Edit rows append their references' latents to the sequence, so their shapes are in the key.
    """

    height: int  # pixels; the rotary embedding uses one image shape per batch
    width: int
    cfg: bool  # true classifier-free guidance doubles the transformer batch
    # Only with `adapter_batching = "separate"`: the adapter names every row of the batch uses.
    adapters: tuple[str, ...] = ()
    # Edit rows: each reference's VAE (width, height), which fixes its latent shape; () = none.
    references: tuple[tuple[int, int], ...] = ()

    def __str__(self) -> str:
        adapters = "".join(f"+{name}" for name in self.adapters)
        references = "".join(f"+ref{width}x{height}" for width, height in self.references)
        return f"{self.width}x{self.height}{'+cfg' if self.cfg else ''}{adapters}{references}"


def strength_steps(steps: int, strength: float) -> int:
    """The steps an image-to-image request runs: the tail of a `steps`-step schedule, cut where
    diffusers' get_timesteps cuts it for `strength`."""
    start = int(max(steps - min(steps * strength, steps), 0))
    return steps - start


@dataclass(frozen=True, slots=True, eq=False)
class InitImage:
    """Image-to-image input: decoded and checked; the engine resizes it as diffusers does."""

    image: PILImage  # RGB
    strength: float  # [config.MIN_STRENGTH, 1]: the fraction of the schedule that runs
    mask: PILImage | None  # white = regenerate, black = keep; None = plain image-to-image


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """A validated generation request: every field is within the server's limits."""

    request_id: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int  # denoising steps the request runs (after strength, for img2img)
    guidance_scale: float  # true CFG scale; 1.0 = off
    seed: int  # image i uses seed + i
    num_images: int
    output_format: OutputFormat
    output_quality: int  # JPEG/WebP quality 1..100
    adapters: tuple[AdapterSpec, ...] = ()
    priority: int = 1  # 1 = highest
    preview_every_n_steps: int = 0  # 0 = no previews
    init_image: InitImage | None = None
    schedule_steps: int = 0  # length of the full schedule img2img starts into; 0 = steps
    variant: str = ""  # the variant it runs as (base.variants); "" = the server has none
    references: ReferenceImages | None = None  # instruction editing (edit models only)

    @property
    def cfg(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def batch_key(self) -> BatchKey:
        return BatchKey(
            height=self.height, width=self.width, cfg=self.cfg, references=self._reference_sizes
        )

    @property
    def adapter_batch_key(self) -> BatchKey:
        """The batch key when rows of different adapters must not share a batch."""
        names = tuple(sorted({spec.name for spec in self.adapters if spec.scale != 0}))
        return BatchKey(
            height=self.height,
            width=self.width,
            cfg=self.cfg,
            adapters=names,
            references=self._reference_sizes,
        )

    @property
    def _reference_sizes(self) -> tuple[tuple[int, int], ...]:
        return self.references.vae_sizes if self.references is not None else ()


@dataclass(slots=True)
class GeneratedImage:
    pixels: np.ndarray  # HxWx3: uint8 for 8-bit formats, float32 in [0, 1] for NPY
    seed: int


@dataclass(slots=True)
class Preview:
    image_index: int  # which of the request's images
    pixels: np.ndarray  # small uint8 HxWx3 from the latent-to-RGB projection


# Events from the engine thread to a request's waiter, in the order a request sees them.


@dataclass(slots=True)
class QueuedEvent:
    position: int  # 0 = next to start
    estimated_start_s: float  # seconds from now


@dataclass(slots=True)
class StartedEvent:
    batch_size: int  # rows in the first denoising step this request ran in
    queued_s: float


@dataclass(slots=True)
class StepEvent:
    step: int  # 1..total_steps
    total_steps: int
    previews: list[Preview] = field(default_factory=list)


@dataclass(slots=True)
class CompletedEvent:
    images: list[GeneratedImage]
    queued_s: float
    compute_s: float
    max_batch_size: int  # most rows in one step this request ran in
    mean_batch_size: float


@dataclass(slots=True)
class FailedEvent:
    error: Exception  # an ImageGenError; mapped to a gRPC status by the service


Event = QueuedEvent | StartedEvent | StepEvent | CompletedEvent | FailedEvent
