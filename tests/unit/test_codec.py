"""Uploaded images as the engine receives them: upright, 8-bit, from every JPEG a phone writes."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from imagegen_server.api.codec import decode_image
from PIL import Image, ImageOps

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


def exif_rotated_90(extra_entry: bytes = b"") -> bytes:
    """EXIF (little-endian TIFF) holding orientation 6 and, optionally, one more IFD entry."""
    entries = [struct.pack("<HHIHH", 0x0112, 3, 1, 6, 0)]  # Orientation, SHORT, 1 value: 6
    if extra_entry:
        entries.append(extra_entry)
    ifd = struct.pack("<H", len(entries)) + b"".join(entries) + struct.pack("<I", 0)
    data_offset = 8 + len(ifd)
    tiff = b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<II", 1, 2)
    assert len(tiff) == data_offset + 8
    return b"Exif\x00\x00" + tiff


def test_an_exif_with_a_mistyped_tag_still_turns_the_image_upright() -> None:
    """Camera files often store a tag in a type Pillow's table does not expect (here the ASCII
    DocumentName as a RATIONAL): Pillow's exif_transpose raises rewriting such an EXIF."""
    mistyped = struct.pack("<HHII", 0x010D, 5, 1, 8 + 2 + 2 * 12 + 4)  # points at the RATIONAL
    data = encoded(gradient(32, 16), "JPEG", exif=exif_rotated_90(mistyped))
    with pytest.raises(AttributeError):  # what the server used to fail on, with INTERNAL
        ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert decode_image(data, "init_image", MAX_PIXELS).size == (16, 32)


def test_a_16_bit_png_is_turned_upright_too() -> None:
    ramp = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (16, 1))
    data = encoded(Image.fromarray(ramp), "PNG", exif=exif_rotated_90())
    image = decode_image(data, "init_image", MAX_PIXELS)
    assert (image.size, image.mode) == ((16, 32), "L")
