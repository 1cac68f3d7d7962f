"""Image-to-image and inpainting: where a row starts, and how inpainting keeps the known region.

Follows diffusers' QwenImageImg2ImgPipeline and QwenImageInpaintPipeline step for step, per row:
the init image is resized and normalised by the pipeline's own image processor and encoded by
the VAE (one call for all requests admitted together, or as many per call as fit on a GPU);
each row's generator, seeded with the row's seed, first samples the VAE posterior and then draws
the noise; the row starts at the first sigma of the tail of its schedule that `strength`
selects. An inpainting row also keeps its image latents, noise and latent-resolution mask, and
after every step puts back the known region, noised to the next sigma.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import QwenImagePipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ..base.types import InitImage
from .decode import set_vae_tiling
from .sampling import LatentShape, SigmaSchedule, initial_noise, normalize, pack


@dataclass(frozen=True, slots=True)
class InpaintState:
    """What an inpainting row needs after each step (packed like the row's latents)."""

    image_latents: torch.Tensor  # [1, seq, channels * 4] the init image's latents
    noise: torch.Tensor  # [1, seq, channels * 4] the row's initial noise
    mask: torch.Tensor  # [1, seq, channels * 4] 1 = regenerate, 0 = keep

    def blend(self, latents: torch.Tensor, next_sigma: float) -> torch.Tensor:
        """Puts the known region back at `next_sigma` (0 after the last step: the image itself)."""
        # A Python float, not a device tensor: no host-to-device copy (which waits for the
        # device) per row per step, and no rounding of sigma to a bfloat16 model's dtype.
        known = next_sigma * self.noise + (1.0 - next_sigma) * self.image_latents
        return (1 - self.mask) * known + self.mask * latents


class InitImageEncoder:
    def __init__(
        self,
        pipeline: QwenImagePipeline,
        device: torch.device,
        dtype: torch.dtype,
        tiling_min_pixels: int = 0,
    ) -> None:
        self._vae = pipeline.vae
        self._tiling_min_pixels = tiling_min_pixels  # as the decoder's: 0 = never tile
        self._image_processor = pipeline.image_processor
        self._mask_processor = VaeImageProcessor(
            vae_scale_factor=pipeline.vae_scale_factor * 2,
            vae_latent_channels=pipeline.vae.config.z_dim,
            do_normalize=False,
            do_binarize=True,
            do_convert_grayscale=True,
        )
        self._device = device
        self._dtype = dtype

    def encode(
        self, images: Sequence[InitImage], height: int, width: int
    ) -> list[DiagonalGaussianDistribution]:
        """The VAE posteriors of the init images, all resized to `width` x `height`, in one call."""
        pixels = torch.cat(
            [
                self._image_processor.preprocess(init.image, height=height, width=width)
                for init in images
            ]
        )
        pixels = pixels.to(torch.float32).to(device=self._device, dtype=self._dtype).unsqueeze(2)
        return self.posteriors(pixels, height, width)

    def posteriors(
        self, pixels: torch.Tensor, height: int, width: int
    ) -> list[DiagonalGaussianDistribution]:
        """One VAE encode of preprocessed [n, 3, 1, height, width] pixels on the device."""
        set_vae_tiling(self._vae, height, width, self._tiling_min_pixels)
        posterior = self._vae.encode(pixels).latent_dist
        return [
            DiagonalGaussianDistribution(posterior.parameters[index : index + 1])
            for index in range(len(pixels))
        ]

    def start(
        self,
        posterior: DiagonalGaussianDistribution,
        init: InitImage,
        seed: int,
        shape: LatentShape,
        schedule: SigmaSchedule,
        height: int,
        width: int,
    ) -> tuple[torch.Tensor, InpaintState | None]:
        """One row's starting latents (and inpainting state), from its own seeded generator."""
        generator = torch.Generator("cpu").manual_seed(seed)
        sample = posterior.sample(generator)  # [1, channels, 1, h, w]: the generator's first use
        image_latents = pack(normalize(sample, self._vae).transpose(1, 2), shape)
        noise = initial_noise(shape, generator, self._dtype, self._device)
        sigma = torch.tensor(schedule.sigmas[0], dtype=image_latents.dtype, device=self._device)
        latents = sigma * noise + (1.0 - sigma) * image_latents
        if init.mask is None:
            return latents, None
        mask = self._mask_processor.preprocess(init.mask, height=height, width=width)
        mask = F.interpolate(mask, size=(shape.height, shape.width)).to(self._device, self._dtype)
        packed_mask = pack(mask.repeat(1, shape.channels, 1, 1), shape)
        return latents, InpaintState(image_latents, noise, packed_mask)
