"""Typed results and progress events, converted from the protobuf messages."""

from __future__ import annotations

import enum
import io
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from imagegen.v1 import imagegen_pb2 as pb

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage


class OutputFormat(enum.IntEnum):
    PNG = pb.OUTPUT_FORMAT_PNG
    JPEG = pb.OUTPUT_FORMAT_JPEG
    WEBP = pb.OUTPUT_FORMAT_WEBP
    NPY = pb.OUTPUT_FORMAT_NPY  # lossless float32 HxWx3 in [0, 1]


@dataclass(frozen=True, slots=True)
class Adapter:
    name: str
    scale: float = 1.0


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    data: bytes  # encoded image (PNG/JPEG/WebP) or .npy bytes
    mime_type: str
    width: int
    height: int
    seed: int

    def to_pil(self) -> PILImage:
        """Decodes the image with Pillow (install Pillow to use this)."""
        from PIL import Image

        image = Image.open(io.BytesIO(self.data))
        image.load()
        return image

    def to_numpy(self) -> Any:
        """HxWx3 array: float32 in [0, 1] for NPY, uint8 otherwise (needs NumPy)."""
        import numpy as np

        if self.mime_type == "application/x-npy":
            return np.load(io.BytesIO(self.data), allow_pickle=False)
        return np.asarray(self.to_pil().convert("RGB"))

    def save(self, path: str) -> None:
        with open(path, "wb") as file:
            file.write(self.data)


@dataclass(frozen=True, slots=True)
class Timings:
    queued_s: float  # accepted -> first denoising step
    compute_s: float  # first step -> decoded
    total_s: float  # accepted -> response ready


@dataclass(frozen=True, slots=True)
class GenerationResult:
    request_id: str
    images: list[GeneratedImage]
    timings: Timings
    batch_size: int  # most rows in one denoising step this request ran in
    mean_batch_size: float
    model: str

    @classmethod
    def from_proto(cls, message: pb.GenerateResponse) -> GenerationResult:
        return cls(
            request_id=message.request_id,
            images=[
                GeneratedImage(image.data, image.mime_type, image.width, image.height, image.seed)
                for image in message.images
            ],
            timings=Timings(
                message.timings.queued_seconds,
                message.timings.compute_seconds,
                message.timings.total_seconds,
            ),
            batch_size=message.batch_size,
            mean_batch_size=message.mean_batch_size,
            model=message.model,
        )


@dataclass(frozen=True, slots=True)
class Queued:
    request_id: str
    position: int  # 0 = next to start
    estimated_start_s: float


@dataclass(frozen=True, slots=True)
class Started:
    request_id: str
    batch_size: int
    queued_s: float


@dataclass(frozen=True, slots=True)
class Preview:
    image_index: int
    data: bytes  # small JPEG
    width: int
    height: int
    mime_type: str = "image/jpeg"


@dataclass(frozen=True, slots=True)
class Step:
    request_id: str
    step: int  # 1..total_steps
    total_steps: int
    previews: list[Preview] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Completed:
    request_id: str
    result: GenerationResult


ProgressEvent = Queued | Started | Step | Completed


def event_from_proto(message: pb.ProgressEvent) -> ProgressEvent:
    kind = message.WhichOneof("event")
    request_id = message.request_id
    if kind == "queued":
        return Queued(request_id, message.queued.position, message.queued.estimated_start_seconds)
    if kind == "started":
        return Started(request_id, message.started.batch_size, message.started.queued_seconds)
    if kind == "step":
        previews = [
            Preview(
                preview.image_index,
                preview.data,
                preview.width,
                preview.height,
                preview.mime_type,
            )
            for preview in message.step.previews
        ]
        return Step(request_id, message.step.step, message.step.total_steps, previews)
    if kind == "completed":
        return Completed(request_id, GenerationResult.from_proto(message.completed.response))
    raise ValueError(f"unknown progress event {kind!r}")
