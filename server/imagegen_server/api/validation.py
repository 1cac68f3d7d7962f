"""GenerateRequest -> GenerationParams: defaults filled in, every field checked against the limits.

A field outside its range raises InvalidArgument whose message names the field and the allowed
range, so a client can fix the request without reading the server's code.
"""

from __future__ import annotations

import math
import re
import secrets
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np
from imagegen.v1 import imagegen_pb2 as pb
from PIL.Image import Image as PILImage

from ..base.config import MIN_STRENGTH
from ..base.errors import InvalidArgument, NotFound
from ..base.limits import RequestLimits
from ..base.references import ReferenceImages
from ..base.types import AdapterSpec, GenerationParams, InitImage, OutputFormat, strength_steps
from ..base.variants import Variant
from .codec import decode_image, resize
from .references import check_edit_inputs, decode_references

OUTPUT_FORMATS = {
    pb.OUTPUT_FORMAT_UNSPECIFIED: OutputFormat.PNG,
    pb.OUTPUT_FORMAT_PNG: OutputFormat.PNG,
    pb.OUTPUT_FORMAT_JPEG: OutputFormat.JPEG,
    pb.OUTPUT_FORMAT_WEBP: OutputFormat.WEBP,
    pb.OUTPUT_FORMAT_NPY: OutputFormat.NPY,
}
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# A mask may differ from its init image in size (both are resized), not in shape.
MAX_MASK_ASPECT_DIFFERENCE = 0.01


@dataclass(frozen=True, slots=True, eq=False)
class DecodedImages:
    """An image-to-image request's pictures, decoded and resized to the output size."""

    image: PILImage  # RGB, width x height
    mask: PILImage | None  # L, width x height
    width: int
    height: int


class RequestValidator:
    def __init__(
        self,
        limits: RequestLimits,
        count_tokens: Callable[[str], int],
        adapter_names: Callable[[], Collection[str]],
        variants: Sequence[Variant] = (),
    ) -> None:
        self.limits = limits
        self._count_tokens = count_tokens
        self._adapter_names = adapter_names
        self._variants = {variant.name: variant for variant in variants}
        # A request that names no variant runs as this one; None: the server has none.
        self._default_variant = next((v for v in variants if v.is_default), None)

    def decode_images(self, request: pb.GenerateRequest) -> DecodedImages | None:
        """Decodes, checks and resizes the init image and mask (CPU work: call it off the event
        loop). None for text-to-image requests.

        Raises:
            InvalidArgument: naming init_image, mask_image, width or height.
        """
        if not request.init_image:
            if request.mask_image or request.HasField("strength"):
                field = "mask_image" if request.mask_image else "strength"
                raise InvalidArgument(field, "needs init_image")
            return None
        limits = self.limits
        image = decode_image(request.init_image, "init_image", limits.max_init_image_pixels)
        width, height = self._edit_size(request, image)
        mask = None
        if request.mask_image:
            mask = decode_image(request.mask_image, "mask_image", limits.max_init_image_pixels)
            image_ratio, mask_ratio = image.width / image.height, mask.width / mask.height
            if abs(image_ratio / mask_ratio - 1) > MAX_MASK_ASPECT_DIFFERENCE:
                raise InvalidArgument(
                    "mask_image",
                    f"{mask.width}x{mask.height} does not have init_image's aspect ratio"
                    f" ({image.width}x{image.height}); both are resized to width x height",
                )
            mask = resize(mask, width, height, "L")
        return DecodedImages(resize(image, width, height, "RGB"), mask, width, height)

    def validate(
        self,
        request: pb.GenerateRequest,
        streaming: bool,
        images: DecodedImages | None = None,
        references: ReferenceImages | None = None,
    ) -> GenerationParams:
        """Raises InvalidArgument (or NotFound for an unknown adapter) naming the field;
        `images` comes from decode_images when the request has an init image, `references`
        from `references.decode_references` when it has reference images."""
        limits = self.limits
        check_edit_inputs(request, limits, bool(request.reference_images))
        if references is None:
            references = decode_references(request, limits)
        if images is None:  # text-to-image: checks only that no image-only field is set
            images = self.decode_images(request)
        num_images = _in_range("num_images", request.num_images or 1, 1, limits.max_num_images)
        width, height = self._output_size(request, images, references)
        variant = self._variant(request.variant)
        schedule_steps = self._steps(request.num_inference_steps, variant)
        init_image = self._init_image(request, images)
        steps = (
            strength_steps(schedule_steps, init_image.strength) if init_image else schedule_steps
        )
        return GenerationParams(
            request_id=self._request_id(request.request_id),
            prompt=self._prompt(
                "prompt", request.prompt, limits.max_prompt_chars, limits.max_prompt_tokens, 1
            ),
            negative_prompt=self._prompt(
                "negative_prompt",
                request.negative_prompt,
                limits.max_negative_prompt_chars,
                limits.max_negative_prompt_tokens,
                0,
            ),
            width=width,
            height=height,
            steps=steps,
            guidance_scale=self._guidance(request, variant),
            seed=self._seed(request, num_images),
            num_images=num_images,
            output_format=_output_format(request.output_format),
            output_quality=_in_range(
                "output_quality", request.output_quality or limits.default_output_quality, 1, 100
            ),
            adapters=self._adapters(request),
            priority=_in_range(
                "priority", request.priority or limits.default_priority, 1, limits.priority_levels
            ),
            preview_every_n_steps=self._preview(request, steps, streaming),
            init_image=init_image,
            schedule_steps=schedule_steps,
            variant=variant.name if variant else "",
            references=references,
        )

    def _output_size(
        self,
        request: pb.GenerateRequest,
        images: DecodedImages | None,
        references: ReferenceImages | None,
    ) -> tuple[int, int]:
        """Width and height: an init image's (already checked), an edit's default from its
        references, or the request's (0 = the server's default)."""
        if images is not None:
            return images.width, images.height
        if references is not None:
            return self._reference_size(request, references)
        limits = self.limits
        return self._size(
            request.width or limits.default_width, request.height or limits.default_height
        )

    def _init_image(
        self, request: pb.GenerateRequest, images: DecodedImages | None
    ) -> InitImage | None:
        if images is None:
            return None
        strength = (
            sent_decimal(request.strength)
            if request.HasField("strength")
            else self.limits.default_strength
        )
        if not math.isfinite(strength) or not MIN_STRENGTH <= strength <= 1:
            raise InvalidArgument("strength", f"{strength:.7g} outside [{MIN_STRENGTH}, 1]")
        return InitImage(images.image, float(strength), images.mask)

    def _edit_size(self, request: pb.GenerateRequest, image: PILImage) -> tuple[int, int]:
        """Edits keep the init image's size (down to the size multiple) unless the request
        names one."""
        multiple = self.limits.size_multiple
        width, height = image.width // multiple * multiple, image.height // multiple * multiple
        described = f"{image.width}x{image.height}"
        return self._derived_size(request, width, height, "init_image", described)

    def _reference_size(
        self, request: pb.GenerateRequest, references: ReferenceImages
    ) -> tuple[int, int]:
        """Edits with references default, as diffusers' edit pipelines, to about one megapixel
        at the last reference's aspect ratio."""
        width, height = references.default_size(self.limits.size_multiple)
        last = references.images[-1]
        described = f"the last reference ({last.width}x{last.height}, at about 1 megapixel)"
        return self._derived_size(request, width, height, "reference_images", described)

    def _derived_size(
        self, request: pb.GenerateRequest, width: int, height: int, source: str, described: str
    ) -> tuple[int, int]:
        """The output size: the request's sides where it sends them, else `width` and `height`
        derived from the image field `source`. What is wrong with a side the client sent is
        reported on that side; what involves a derived side (that side, or the area) on
        `source`."""
        if request.width and request.height:
            return self._size(request.width, request.height)
        for name in ("width", "height"):
            if getattr(request, name):
                self._side(name, getattr(request, name))
        width, height = request.width or width, request.height or height
        try:
            return self._size(width, height)
        except InvalidArgument as error:
            raise InvalidArgument(
                source,
                f"{described} gives a {width}x{height} output, and {error}; "
                "send width and height to resize it",
            ) from error

    def _size(self, width: int, height: int) -> tuple[int, int]:
        limits = self.limits
        self._side("width", width)
        self._side("height", height)
        if width * height > limits.max_pixels:
            raise InvalidArgument(
                "width", f"width x height = {width * height} exceeds max_pixels {limits.max_pixels}"
            )
        return width, height

    def _side(self, name: str, value: int) -> None:
        """Checks a width or height alone: its range and the size multiple."""
        limits = self.limits
        low, high = (
            (limits.min_width, limits.max_width)
            if name == "width"
            else (limits.min_height, limits.max_height)
        )
        _in_range(name, value, low, high)
        if value % limits.size_multiple:
            raise InvalidArgument(
                name,
                f"{value} is not a multiple of {limits.size_multiple}"
                f" (allowed: multiples of {limits.size_multiple} in [{low}, {high}])",
            )

    def _prompt(
        self, field: str, text: str, max_chars: int, max_tokens: int, min_chars: int
    ) -> str:
        if len(text) < min_chars or len(text) > max_chars:
            raise InvalidArgument(
                field, f"{len(text)} characters; allowed [{min_chars}, {max_chars}]"
            )
        if "\x00" in text:
            raise InvalidArgument(field, "contains a NUL character")
        tokens = self._count_tokens(text) if text else 0
        if tokens > max_tokens:
            raise InvalidArgument(field, f"{tokens} tokens; allowed at most {max_tokens}")
        return text

    def _variant(self, name: str) -> Variant | None:
        """The variant a request runs as: the one it names, else the default (None when the
        server has none).

        Raises:
            NotFound: naming `variant` and the variants there are.
        """
        if not name:
            return self._default_variant
        variant = self._variants.get(name)
        if variant is None:
            known = ", ".join(sorted(self._variants)) or "none: this server serves one model as is"
            raise NotFound(f"variant: {name!r} is not a variant of this server (variants: {known})")
        return variant

    def _steps(self, steps: int, variant: Variant | None) -> int:
        """The schedule's steps: the request's, else its variant's default, within the
        variant's range (or the server's, without variants)."""
        limits = self.limits
        if variant is None:
            return _in_range(
                "num_inference_steps",
                steps or limits.default_steps,
                limits.min_steps,
                limits.max_steps,
            )
        steps = steps or variant.default_steps
        if not variant.min_steps <= steps <= variant.max_steps:
            raise InvalidArgument(
                "num_inference_steps",
                f"{steps} outside [{variant.min_steps}, {variant.max_steps}], the range of"
                f" variant {variant.name!r}",
            )
        return steps

    def _guidance(self, request: pb.GenerateRequest, variant: Variant | None) -> float:
        if not request.HasField("guidance_scale"):
            return variant.default_guidance_scale if variant else 1.0
        value = request.guidance_scale
        low, high = self.limits.min_guidance_scale, self.limits.max_guidance_scale
        if not math.isfinite(value) or not low <= value <= high:
            raise InvalidArgument("guidance_scale", f"{value} outside [{low}, {high}] (1.0 = off)")
        return float(value)

    def _seed(self, request: pb.GenerateRequest, num_images: int) -> int:
        low = self.limits.min_seed
        high = self.limits.max_seed - (num_images - 1)  # image i uses seed + i
        if not request.HasField("seed"):
            return low + secrets.randbelow(high - low + 1)
        return _in_range("seed", request.seed, low, high)

    def _adapters(self, request: pb.GenerateRequest) -> tuple[AdapterSpec, ...]:
        limits = self.limits
        if len(request.adapters) > limits.max_adapters_per_request:
            raise InvalidArgument(
                "adapters",
                f"{len(request.adapters)} given; allowed at most {limits.max_adapters_per_request}",
            )
        specs: list[AdapterSpec] = []
        known = self._adapter_names()
        for index, adapter in enumerate(request.adapters):
            field = f"adapters[{index}]"
            scale = adapter.scale if adapter.HasField("scale") else 1.0
            if (
                not math.isfinite(scale)
                or not limits.min_adapter_scale <= scale <= limits.max_adapter_scale
            ):
                raise InvalidArgument(
                    f"{field}.scale",
                    f"{scale} outside [{limits.min_adapter_scale}, {limits.max_adapter_scale}]",
                )
            if adapter.name not in known:
                raise NotFound(
                    f"{field}.name: adapter {adapter.name!r} is not available: no such file in"
                    " the adapter directory, or being unloaded (ListAdapters shows which)",
                    field=f"{field}.name",
                )
            if any(spec.name == adapter.name for spec in specs):
                raise InvalidArgument(f"{field}.name", f"adapter {adapter.name!r} named twice")
            specs.append(AdapterSpec(adapter.name, float(scale)))
        return tuple(specs)

    def _preview(self, request: pb.GenerateRequest, steps: int, streaming: bool) -> int:
        every = request.preview_every_n_steps
        if every == 0 or not streaming:
            return 0
        return _in_range(
            "preview_every_n_steps", every, self.limits.min_preview_every_n_steps, steps
        )

    @staticmethod
    def _request_id(value: str) -> str:
        if not value:
            return uuid.uuid4().hex
        if not REQUEST_ID_PATTERN.fullmatch(value):
            raise InvalidArgument("request_id", "1-128 characters from [A-Za-z0-9._:-]")
        return value


def sent_decimal(value: float) -> float:
    """The decimal a client meant by a proto float32: its shortest round-trip form.

    0.6 arrives as 0.60000002384, and with it an image-to-image request of 10 steps would run 7
    steps where diffusers, given the Python float 0.6, runs 6."""
    return float(str(np.float32(value)))


def _in_range(field: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise InvalidArgument(field, f"{value} outside [{low}, {high}]")
    return int(value)


def _output_format(value: int) -> OutputFormat:
    output_format: OutputFormat | None = OUTPUT_FORMATS.get(value)  # type: ignore[call-overload]
    if output_format is None:
        allowed = ", ".join(pb.OutputFormat.Name(v) for v in OUTPUT_FORMATS)
        raise InvalidArgument("output_format", f"unknown value {value}; allowed {allowed}")
    return output_format
