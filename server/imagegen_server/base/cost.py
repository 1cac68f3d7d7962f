"""What a request costs: its denoising work, in one unit shared by quotas, fair share and logs.

The unit is the megapixel-step: one step of the transformer over one million output pixels. A
request costs the sum over its images of width x height x steps, doubled with true classifier-
free guidance (the transformer runs twice per step), divided by 10^6. So 4 images at 1024x1024
with 30 steps and CFG cost 4 x 1.048576 x 30 x 2 = 251.66 units, and one 512x512 image with 4
steps costs 1.05. An edit's reference images count too: their latents (each at the size the
pipelines VAE-encode it, about one megapixel) join every row's sequence, so the transformer
works on them at every step; each adds its pixels to every image's. Decoding, encoding and text
encoding are not counted: they are small beside the denoising steps and do not grow with the
step count.
"""

from __future__ import annotations

from .types import GenerationParams

COST_UNIT = "megapixel-step"  # shown as ServerInfo.cost_unit
PIXELS_PER_UNIT = 1_000_000


def request_cost(params: GenerationParams) -> float:
    """The request's denoising work in megapixel-steps (see the module docstring)."""
    passes = 2 if params.cfg else 1
    pixels = (params.width * params.height + _reference_pixels(params)) * params.num_images
    return pixels * params.steps * passes / PIXELS_PER_UNIT


def _reference_pixels(params: GenerationParams) -> int:
    """Pixels of an edit's reference latents, which share each row's transformer sequence."""
    if params.references is None:
        return 0
    return sum(width * height for width, height in params.references.vae_sizes)
