"""Typed results, progress events and server descriptions, converted from the protobuf messages.

The description types (`ServerInfo`, `Limits`, `BatchingInfo`, `ResolutionBatchLimit`,
`AdapterInfo`) have the field names of their messages and are filled name by name, so a field
added to the proto fails tests/unit/test_client_types.py until it is added here too.
"""

from __future__ import annotations

import dataclasses
import enum
import io
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf.message import Message
from imagegen.v1 import imagegen_pb2 as pb

if TYPE_CHECKING:
    from _typeshed import DataclassInstance
    from PIL.Image import Image as PILImage

    _D = TypeVar("_D", bound=DataclassInstance)


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
    variant: str = ""  # the variant it ran as ("" when the server has none)
    cost: float = 0.0  # its work in ServerInfo.cost_unit (0 when the server does not count it)

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
            variant=message.variant,
            cost=message.cost,
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


@dataclass(frozen=True, slots=True)
class Limits:
    """The ranges a request must respect; 0 in a request means the `default_*` value."""

    size_multiple: int  # width and height must be multiples of this
    min_width: int
    max_width: int
    min_height: int
    max_height: int
    max_pixels: int  # most width x height
    default_width: int
    default_height: int
    max_steps: int
    default_steps: int
    max_num_images: int  # images per request
    max_prompt_chars: int
    max_prompt_tokens: int  # text-encoder tokens
    max_negative_prompt_chars: int
    max_negative_prompt_tokens: int
    min_guidance_scale: float  # true CFG; 1.0 = off
    max_guidance_scale: float
    min_seed: int
    max_seed: int  # image i of a request uses seed + i, which must not pass this
    max_adapters_per_request: int
    min_adapter_scale: float
    max_adapter_scale: float
    max_request_bytes: int  # the whole request message, init and mask images included
    min_preview_every_n_steps: int  # most frequent preview allowed
    priority_levels: int  # 1 = highest
    default_priority: int
    output_formats: tuple[OutputFormat, ...]  # those this client knows; others are left out
    min_steps: int  # 2 when the model's scheduler cannot make a 1-step schedule
    max_init_image_pixels: int  # largest init or mask image accepted, width x height
    default_strength: float  # image-to-image strength when a request gives none
    default_output_quality: int  # JPEG/WebP quality when a request gives 0
    max_reference_images: int  # 0: the model takes no reference images (not an edit model)

    @classmethod
    def from_proto(cls, message: pb.Limits) -> Limits:
        known = {int(fmt) for fmt in OutputFormat}
        formats = tuple(OutputFormat(fmt) for fmt in message.output_formats if fmt in known)
        return _from_message(cls, message, output_formats=formats)


@dataclass(frozen=True, slots=True)
class ResolutionBatchLimit:
    width: int
    height: int
    max_batch_size: int  # most rows of this size that fit the device (start-up memory probe)


@dataclass(frozen=True, slots=True)
class BatchingInfo:
    policy: str  # "step" (continuous) or "request" (Triton-style)
    max_batch_size: int  # rows per denoising step
    max_queue_delay_ms: float
    max_queue_size: int  # 0 = unbounded
    preferred_batch_sizes: tuple[int, ...]
    batch_limits: tuple[ResolutionBatchLimit, ...]  # per resolution, each <= max_batch_size
    row_selection: str  # "cost" or "all": which rows a step of the step policy runs

    @classmethod
    def from_proto(cls, message: pb.BatchingInfo) -> BatchingInfo:
        limits = tuple(_from_message(ResolutionBatchLimit, item) for item in message.batch_limits)
        return _from_message(cls, message, batch_limits=limits)


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    name: str  # what `Adapter(name)` and `load_adapter(name)` take
    format: str  # "kohya" or "peft"
    loaded: bool  # selectable by requests
    rank: int
    parameters: int
    size_bytes: int
    unloading: bool  # being unloaded: new requests may not name it, running ones finish

    @classmethod
    def from_proto(cls, message: pb.AdapterInfo) -> AdapterInfo:
        return _from_message(cls, message)


@dataclass(frozen=True, slots=True)
class VariantInfo:
    """A named configuration of the served model that a request may pick."""

    name: str
    loras: tuple[Adapter, ...]  # the LoRAs applied to its rows, with their scales
    scheduler_preset: str  # "default" or "lightning"
    default_steps: int
    default_guidance_scale: float
    min_steps: int
    max_steps: int
    is_default: bool  # used when a request names no variant

    @classmethod
    def from_proto(cls, message: pb.VariantInfo) -> VariantInfo:
        loras = tuple(
            Adapter(ref.name, ref.scale if ref.HasField("scale") else 1.0) for ref in message.loras
        )
        return _from_message(cls, message, loras=loras)


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What GetServerInfo reports; the model's fields and `limits` are empty (0) until the model
    is loaded."""

    model: str
    server_version: str
    device: str  # e.g. "cpu", "cuda:0"
    dtype: str  # e.g. "float32", "bfloat16"
    scheduler_preset: str  # "default" or "lightning"
    limits: Limits
    batching: BatchingInfo
    adapters: tuple[AdapterInfo, ...]  # the loaded adapters a request may name
    fused_adapters: tuple[str, ...]  # base LoRAs fused at start-up; not selectable per request
    ready: bool  # model loaded and warmed up, not draining
    pipeline: str  # "text-to-image", "edit" or "edit-plus"
    variants: tuple[VariantInfo, ...]  # named variants a request may pick; empty = none
    cost_unit: str  # what GenerationResult.cost and the quotas count, in words

    @classmethod
    def from_proto(cls, message: pb.ServerInfo) -> ServerInfo:
        return _from_message(
            cls,
            message,
            limits=Limits.from_proto(message.limits),
            batching=BatchingInfo.from_proto(message.batching),
            adapters=tuple(AdapterInfo.from_proto(item) for item in message.adapters),
            variants=tuple(VariantInfo.from_proto(item) for item in message.variants),
        )


def _from_message(cls: type[_D], message: Message, **converted: object) -> _D:
    """A `cls` whose fields are the message's fields of the same names (repeated ones as tuples),
    except those given in `converted` (nested messages, enums)."""
    values: dict[str, object] = {}
    for item in dataclasses.fields(cls):
        if item.name in converted:
            values[item.name] = converted[item.name]
        elif message.DESCRIPTOR.fields_by_name[item.name].is_repeated:
            values[item.name] = tuple(getattr(message, item.name))
        else:
            values[item.name] = getattr(message, item.name)
    return cls(**values)
