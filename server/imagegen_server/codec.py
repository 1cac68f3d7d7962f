"""Image bytes in and out (Pillow), run off the engine thread."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

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
    Image.fromarray(pixels, mode="RGB").save(buffer, format=_PIL_FORMATS[output_format], **options)
    return buffer.getvalue()


def encode_preview(pixels: np.ndarray) -> bytes:
    return encode_image(pixels, OutputFormat.JPEG, PREVIEW_QUALITY)
