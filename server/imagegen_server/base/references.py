"""Reference images of an instruction edit (Qwen-Image-Edit and Edit-Plus), and the sizes the
edit pipelines derive from them.

The sizes follow diffusers' `QwenImageEditPipeline` / `QwenImageEditPlusPipeline`: each
reference goes to the VAE at about one megapixel with its own aspect ratio (rounded to 32), and
the output, unless the request names a size, takes the last reference's (`calculate_dimensions`).
Nothing here imports torch: validation computes the sizes, and the batch key carries them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL.Image import Image as PILImage

# The pipelines' pixel area for a reference's VAE latents and for the default output size.
VAE_IMAGE_AREA = 1024 * 1024
# Edit-Plus shows the text encoder each reference at this area (Edit: at VAE_IMAGE_AREA).
CONDITION_IMAGE_AREA = 384 * 384
# The pipelines round the derived sizes to this many pixels.
DIMENSION_ROUNDING = 32

# GetServerInfo's `pipeline` for each kind of model, and the references each takes.
TEXT_TO_IMAGE = "text-to-image"
EDIT = "edit"
EDIT_PLUS = "edit-plus"
MAX_REFERENCE_IMAGES = {TEXT_TO_IMAGE: 0, EDIT: 1, EDIT_PLUS: 3}


def calculate_dimensions(area: int, ratio: float) -> tuple[int, int]:
    """(width, height) of about `area` pixels at `ratio` = width / height, each rounded to 32,
    as the edit pipelines' `calculate_dimensions`."""
    width = math.sqrt(area * ratio)
    height = width / ratio
    return (
        round(width / DIMENSION_ROUNDING) * DIMENSION_ROUNDING,
        round(height / DIMENSION_ROUNDING) * DIMENSION_ROUNDING,
    )


@dataclass(frozen=True, slots=True, eq=False)
class ReferenceImages:
    """An edit request's reference images, decoded and checked (the engine resizes them)."""

    images: tuple[PILImage, ...]  # RGB, upright, as sent; "Picture 1" first
    digest: str  # of the bytes sent, in order: the prompt cache's key beside the text

    @property
    def vae_sizes(self) -> tuple[tuple[int, int], ...]:
        """(width, height) at which each reference is VAE-encoded: what its latent shape, and
        so the batch key, follows."""
        return tuple(
            calculate_dimensions(VAE_IMAGE_AREA, image.width / image.height)
            for image in self.images
        )

    def default_size(self, multiple: int) -> tuple[int, int]:
        """The output size the pipelines choose when the request names none: about one
        megapixel at the last reference's aspect ratio, down to a multiple of `multiple`."""
        last = self.images[-1]
        width, height = calculate_dimensions(VAE_IMAGE_AREA, last.width / last.height)
        return width // multiple * multiple, height // multiple * multiple
