"""An independent judge of a GenerateRequest: from the limits GetServerInfo publishes (and the
documented meaning of each field), which fields are invalid and what status the server owes.

Written from the API's contract (protos/imagegen/v1/imagegen.proto, docs), not from the
server's validator, so that the fuzz test checks the one against the other. Where several
fields are wrong the server may name any of them; where an unknown adapter meets an invalid
field either status is right (the order of the checks is not part of the contract).
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field

import grpc
import numpy as np
from imagegen.v1 import imagegen_pb2 as pb
from PIL import Image

# Request ids a client may choose (docs/api.md).
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# The least image-to-image strength (docs/api.md): below it no step would run.
MIN_STRENGTH = 1e-6


@dataclass
class Verdict:
    """What the server owes a request."""

    invalid: set[str] = field(default_factory=set)  # fields any of which INVALID_ARGUMENT names
    unknown_adapter: bool = False  # a name that is not loaded: NOT_FOUND

    @property
    def codes(self) -> set[grpc.StatusCode]:
        codes = set()
        if self.invalid:
            codes.add(grpc.StatusCode.INVALID_ARGUMENT)
        if self.unknown_adapter:
            codes.add(grpc.StatusCode.NOT_FOUND)
        return codes or {grpc.StatusCode.OK}


@dataclass(frozen=True)
class _Image:
    width: int
    height: int


class RequestOracle:
    def __init__(self, limits: pb.Limits, loaded_adapters: set[str]) -> None:
        self.limits = limits
        self.loaded = loaded_adapters

    def judge(self, request: pb.GenerateRequest, streaming: bool) -> Verdict:
        verdict = Verdict()
        size = self._edit(request, verdict)
        images = request.num_images or 1
        if not 1 <= images <= self.limits.max_num_images:
            verdict.invalid.add("num_images")
            images = 1
        if size is None:
            self._size(request.width, request.height, verdict)
        steps = self._steps(request, verdict)
        self._texts(request, verdict)
        self._numbers(request, images, verdict)
        self._adapters(request, verdict)
        every = request.preview_every_n_steps
        if streaming and every and not self.limits.min_preview_every_n_steps <= every <= steps:
            verdict.invalid.add("preview_every_n_steps")
        if request.request_id and not REQUEST_ID.fullmatch(request.request_id):
            verdict.invalid.add("request_id")
        return verdict

    def _edit(self, request: pb.GenerateRequest, verdict: Verdict) -> _Image | None:
        """Init image, mask and strength; the output size of a valid edit (None otherwise)."""
        if not request.init_image:
            if request.mask_image:
                verdict.invalid.add("mask_image")
            elif request.HasField("strength"):
                verdict.invalid.add("strength")
            return None
        image = _open(request.init_image)
        if image is None or image.width * image.height > self.limits.max_init_image_pixels:
            verdict.invalid.add("init_image")
            return None
        if request.mask_image:
            mask = _open(request.mask_image)
            if (
                mask is None
                or abs(image.width / image.height * mask.height / mask.width - 1) > 0.01
            ):
                verdict.invalid.add("mask_image")
        if request.HasField("strength"):
            strength = float(str(np.float32(request.strength)))  # the decimal the client sent
            if not (math.isfinite(strength) and MIN_STRENGTH <= strength <= 1):
                verdict.invalid.add("strength")
        if request.width and request.height:
            self._size(request.width, request.height, verdict)
        else:  # a side not sent is the image's, down to the size multiple
            for name, value in (("width", request.width), ("height", request.height)):
                if value and not self._side_ok(name, value):
                    verdict.invalid.add(name)
            multiple = self.limits.size_multiple
            width = request.width or image.width // multiple * multiple
            height = request.height or image.height // multiple * multiple
            sides_ok = self._side_ok("width", width) and self._side_ok("height", height)
            if not sides_ok or width * height > self.limits.max_pixels:
                verdict.invalid.add("init_image")
        return image

    def _side_ok(self, name: str, value: int) -> bool:
        low, high = (
            (self.limits.min_width, self.limits.max_width)
            if name == "width"
            else (self.limits.min_height, self.limits.max_height)
        )
        return low <= value <= high and value % self.limits.size_multiple == 0

    def _size(self, width: int, height: int, verdict: Verdict) -> None:
        width = width or self.limits.default_width
        height = height or self.limits.default_height
        for name, value in (("width", width), ("height", height)):
            if not self._side_ok(name, value):
                verdict.invalid.add(name)
        if width * height > self.limits.max_pixels:
            verdict.invalid.add("width")

    def _steps(self, request: pb.GenerateRequest, verdict: Verdict) -> int:
        """Checks num_inference_steps; returns the steps that run (an edit runs the tail of
        its schedule that its strength asks for, as diffusers' get_timesteps cuts it)."""
        steps = request.num_inference_steps or self.limits.default_steps
        if not self.limits.min_steps <= steps <= self.limits.max_steps:
            verdict.invalid.add("num_inference_steps")
        if not request.init_image:
            return steps
        strength = (
            float(str(np.float32(request.strength)))
            if request.HasField("strength")
            else float(str(np.float32(self.limits.default_strength)))
        )
        if not (math.isfinite(strength) and 0 <= strength <= 1):
            return steps
        return steps - int(max(steps - min(steps * strength, steps), 0))

    def _texts(self, request: pb.GenerateRequest, verdict: Verdict) -> None:
        """Characters only: the fuzz keeps every text either short enough that its tokens fit
        or longer in characters than allowed (token limits have their own tests)."""
        for name, text, least, most in (
            ("prompt", request.prompt, 1, self.limits.max_prompt_chars),
            ("negative_prompt", request.negative_prompt, 0, self.limits.max_negative_prompt_chars),
        ):
            if not least <= len(text) <= most or "\x00" in text:
                verdict.invalid.add(name)

    def _numbers(self, request: pb.GenerateRequest, images: int, verdict: Verdict) -> None:
        limits = self.limits
        if request.HasField("guidance_scale"):
            value = request.guidance_scale
            low, high = limits.min_guidance_scale, limits.max_guidance_scale
            if not (math.isfinite(value) and low <= value <= high):
                verdict.invalid.add("guidance_scale")
        if request.HasField("seed") and not (
            limits.min_seed <= request.seed <= limits.max_seed - (images - 1)
        ):
            verdict.invalid.add("seed")
        allowed_formats = {pb.OUTPUT_FORMAT_UNSPECIFIED, *limits.output_formats}
        if request.output_format not in allowed_formats:
            verdict.invalid.add("output_format")
        if not 1 <= (request.output_quality or limits.default_output_quality) <= 100:
            verdict.invalid.add("output_quality")
        if not 1 <= (request.priority or limits.default_priority) <= limits.priority_levels:
            verdict.invalid.add("priority")

    def _adapters(self, request: pb.GenerateRequest, verdict: Verdict) -> None:
        limits = self.limits
        if len(request.adapters) > limits.max_adapters_per_request:
            verdict.invalid.add("adapters")
            return
        seen: set[str] = set()
        for index, adapter in enumerate(request.adapters):
            scale = adapter.scale if adapter.HasField("scale") else 1.0
            low, high = limits.min_adapter_scale, limits.max_adapter_scale
            if not (math.isfinite(scale) and low <= scale <= high):
                verdict.invalid.add(f"adapters[{index}].scale")
            if adapter.name not in self.loaded:
                verdict.unknown_adapter = True
            elif adapter.name in seen:
                verdict.invalid.add(f"adapters[{index}].name")
            seen.add(adapter.name)


def _open(data: bytes) -> _Image | None:
    """The size of a PNG, JPEG or WebP the server must accept, None for anything else."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in {"PNG", "JPEG", "MPO", "WEBP"}:
                return None
            image.load()
            return _Image(*image.size)
    except Exception:  # any failure to decode is an undecodable upload
        return None
