"""Image bytes in and out (Pillow), run off the engine thread and off the event loop."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .errors import InvalidArgument
from .types import OutputFormat

PREVIEW_QUALITY = 75
_PIL_FORMATS = {OutputFormat.PNG: "PNG", OutputFormat.JPEG: "JPEG", OutputFormat.WEBP: "WEBP"}


def encode_image(pixels: np.ndarray, output_format: OutputFormat, quality: int) -> bytes:
    """HxWx3 pixels (uint8, or float32 in [0, 1] for NPY) -> file bytes in `output_format`."""
    buffer = io.BytesIO()
    if output_format is OutputFormat.NPY:
        np.save(buffer, np.ascontiguousarray(pixels, dtype=np.float32), allow_pickle=False)
        return buffer.getvalue()
    options: dict[str, object] = {}
    if output_format in (OutputFormat.JPEG, OutputFormat.WEBP):
        options["quality"] = quality
    if output_format is OutputFormat.PNG:
        options["compress_level"] = 1  # fast; PNG is lossless at any level
    Image.fromarray(pixels).save(buffer, format=_PIL_FORMATS[output_format], **options)
    return buffer.getvalue()


def encode_preview(pixels: np.ndarray) -> bytes:
    return encode_image(pixels, OutputFormat.JPEG, PREVIEW_QUALITY)


def decode_image(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """Decodes an uploaded PNG, JPEG or WebP, refusing anything larger than `max_pixels`
    before the pixels are decompressed (decompression bombs).

    Raises:
        InvalidArgument: naming `field`, for undecodable or oversized images.
    """
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in _PIL_FORMATS.values():
            raise InvalidArgument(
                field, f"{image.format} images are not accepted; use PNG, JPEG or WebP"
            )
        width, height = image.size
        if width * height > max_pixels:
            raise InvalidArgument(
                field, f"{width}x{height} = {width * height} pixels; allowed at most {max_pixels}"
            )
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise InvalidArgument(
            field, f"not a decodable PNG, JPEG or WebP image ({error})"
        ) from error
    return image


def resize(image: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    """Converts then resizes as diffusers' VaeImageProcessor does (Lanczos), so the engine's
    own preprocessing finds the image at its size and leaves it as it is."""
    converted = image.convert(mode)
    if converted.size == (width, height):
        return converted
    return converted.resize((width, height), resample=Image.Resampling.LANCZOS)
