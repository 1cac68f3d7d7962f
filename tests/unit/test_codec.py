"""Uploaded images as the engine receives them: upright, 8-bit, from every JPEG a phone writes."""

from __future__ import annotations

import io

import numpy as np
from imagegen_server.codec import decode_image
from PIL import Image

MAX_PIXELS = 4096 * 4096


def encoded(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def gradient(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, np.zeros_like(x)], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def test_a_16_bit_greyscale_png_keeps_its_tones() -> None:
    """Pillow's convert clamps 16-bit values at 255: a 0..65535 ramp must become 0..255."""
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    image = decode_image(encoded(Image.fromarray(ramp), "PNG"), "init_image", MAX_PIXELS)
    values = np.asarray(image.convert("RGB"))[..., 0]
    np.testing.assert_array_equal(values[0], (ramp[0] >> 8).astype(np.uint8))


def test_an_exif_rotated_jpeg_comes_upright() -> None:
    """Stored 96x64 with orientation 6 (rotate 90 degrees clockwise to show): shown 64x96."""
    stored = gradient(96, 64)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    image = decode_image(encoded(stored, "JPEG", exif=exif.tobytes()), "init_image", MAX_PIXELS)
    assert image.size == (64, 96)
    upright = np.asarray(stored.transpose(Image.Transpose.ROTATE_270), dtype=np.float32)
    assert np.abs(np.asarray(image, dtype=np.float32) - upright).mean() < 4  # JPEG loss only


def test_a_jpeg_with_a_second_picture_is_a_jpeg() -> None:
    """Phones write MPO (a JPEG with a depth or gain-map picture): its first picture is used."""
    first = gradient(64, 48)
    data = encoded(first, "MPO", save_all=True, append_images=[first.resize((32, 24))])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    image = decode_image(data, "init_image", MAX_PIXELS)
    assert image.size == (64, 48)
    shown = np.asarray(image.convert("RGB"), np.float32)
    assert np.abs(shown - np.asarray(first, np.float32)).mean() < 4  # JPEG loss only
