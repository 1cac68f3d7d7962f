"""Edits at other shapes than the square, with true CFG: image-to-image and inpainting through
the server equal diffusers' own pipelines (1e-5), inpainting at full strength included (where
every latent starts from noise and only the blend keeps the unmasked region)."""

from __future__ import annotations

from typing import Any

import pytest
from imagegen_client import OutputFormat
from support import assert_same_image, pipeline_image, pixels, png

NPY = OutputFormat.NPY
PROMPT = "a boat on a lake"
NEGATIVE = "blurry, low quality"


@pytest.mark.parametrize("width,height", [(96, 64), (48, 80)])
def test_image_to_image_with_cfg_at_a_non_square_size_equals_diffusers(
    server: Any, img2img: Any, picture: Any, width: int, height: int
) -> None:
    result = server.client().generate(
        PROMPT,
        negative_prompt=NEGATIVE,
        guidance_scale=4.0,
        init_image=png(picture),
        strength=0.7,
        width=width,
        height=height,
        steps=6,
        seed=21,
        output_format=NPY,
    )
    expected = pipeline_image(
        img2img,
        PROMPT,
        21,
        width=width,
        height=height,
        steps=6,
        negative_prompt=NEGATIVE,
        guidance=4.0,
        image=picture,
        strength=0.7,
    )
    assert pixels(result).shape == (height, width, 3)
    assert_same_image(pixels(result), expected)


@pytest.mark.parametrize(
    "strength,guidance", [(1.0, 1.0), (1.0, 3.5), (0.6, 3.5)], ids=["full", "full-cfg", "cfg"]
)
def test_inpainting_at_a_non_square_size_equals_diffusers(
    server: Any, inpaint: Any, picture: Any, mask: Any, strength: float, guidance: float
) -> None:
    negative = NEGATIVE if guidance > 1 else ""
    result = server.client().generate(
        PROMPT,
        negative_prompt=negative,
        guidance_scale=guidance,
        init_image=png(picture),
        mask_image=png(mask),
        strength=strength,
        width=96,
        height=64,
        steps=4,
        seed=13,
        output_format=NPY,
    )
    expected = pipeline_image(
        inpaint,
        PROMPT,
        13,
        width=96,
        height=64,
        steps=4,
        negative_prompt=negative if guidance > 1 else None,
        guidance=guidance,
        image=picture,
        mask_image=mask,
        strength=strength,
    )
    assert_same_image(pixels(result), expected)
