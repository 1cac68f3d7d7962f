"""Image bytes in and out (Pillow), run off the engine thread and off the event loop."""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import ExifTags, Image

from ..base.errors import InvalidArgument
from ..base.types import OutputFormat

PREVIEW_QUALITY = 75
_PIL_FORMATS = {OutputFormat.PNG: "PNG", OutputFormat.JPEG: "JPEG", OutputFormat.WEBP: "WEBP"}
_ACCEPTED_FORMATS = {*_PIL_FORMATS.values(), "MPO"}
# EXIF orientation -> the transpose that shows the image upright (1 = already upright).
_ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


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
    """Decodes an uploaded PNG, JPEG (MPO too: a JPEG with a second picture, as phones write) or
    WebP, refusing anything larger than `max_pixels` before the pixels are decompressed
    (decompression bombs). The image comes back upright (EXIF orientation applied, as diffusers'
    `load_image` does) and at 8 bits per channel.

    Raises:
        InvalidArgument: naming `field`, for undecodable or oversized images.
    """
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in _ACCEPTED_FORMATS:
            raise InvalidArgument(
                field, f"{image.format} images are not accepted; use PNG, JPEG or WebP"
            )
        width, height = image.size
        if width * height > max_pixels:
            raise InvalidArgument(
                field, f"{width}x{height} = {width * height} pixels; allowed at most {max_pixels}"
            )
        image.load()
        return _eight_bit(_upright(image))
    except Image.DecompressionBombError as error:  # Pillow's own limit, above ours
        raise InvalidArgument(field, f"{error}; allowed at most {max_pixels} pixels") from error
    # A cut or corrupted file fails in Pillow's parsers with any of these.
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as error:
        raise InvalidArgument(
            field, f"not a decodable PNG, JPEG or WebP image ({error})"
        ) from error


def _upright(image: Image.Image) -> Image.Image:
    """The image as shown: turned by its EXIF orientation, the EXIF itself left behind.

    Pillow's `ImageOps.exif_transpose` also rewrites the EXIF, which raises on tags whose stored
    type does not match Pillow's table (common in camera files); the server never sends the
    EXIF back, so only the orientation is read, and an unreadable one counts as upright."""
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # any malformed EXIF: the pixels are still good
        return image
    method = _ORIENTATIONS.get(orientation)
    return image if method is None else image.transpose(method)


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit greyscale PNGs open as 16/32-bit integer modes, which Pillow's convert clamps at
    255 instead of scaling: keep their top 8 bits."""
    if image.mode != "I" and not image.mode.startswith("I;16"):
        return image
    values = np.asarray(image).astype(np.int64)
    return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), mode="L")


def resize(image: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    """Converts then resizes as diffusers' VaeImageProcessor does (Lanczos), so the engine's
    own preprocessing finds the image at its size and leaves it as it is."""
    converted = image.convert(mode)
    if converted.size == (width, height):
        return converted
    return converted.resize((width, height), resample=Image.Resampling.LANCZOS)
