"""Latents to pixels: the batched VAE decode of finished rows, and cheap previews."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKLQwenImage

from .preview import PreviewProjector
from .sampling import denormalize, unpack


def set_vae_tiling(vae: AutoencoderKLQwenImage, height: int, width: int, min_pixels: int) -> None:
    """Makes the VAE's next encode or decode, of `height` x `width` images, tiled when they have
    at least `min_pixels` pixels (0 = never); tiles bound its memory, seams are blended.

    `vae.use_tiling` is one flag that both `encode` and `decode` read, so every call on the
    serving path sets it from its own size just before it runs: the size of whichever call came
    last (a large decode) never decides whether the next one (a small init image's encode) is
    tiled, which would change its pixels.
    """
    vae.use_tiling = 0 < min_pixels <= height * width


class Decoder:
    def __init__(
        self,
        vae: AutoencoderKLQwenImage,
        vae_scale_factor: int,
        device: torch.device,
        tiling_min_pixels: int = 0,
    ) -> None:
        self._vae = vae
        self._scale = vae_scale_factor
        self._device = device
        self._tiling_min_pixels = tiling_min_pixels
        self._projector = PreviewProjector.fit(vae, vae_scale_factor, device)

    def images(
        self, latents: torch.Tensor, height: int, width: int, float_output: list[bool]
    ) -> list[np.ndarray]:
        """Decodes [n, seq, channels * 4] latents in one VAE call, as QwenImagePipeline does.

        Returns HxWx3 arrays: float32 in [0, 1] where `float_output`, else uint8 rounded as
        the pipeline's PIL conversion rounds.
        """
        unpacked = unpack(latents, height, width, self._scale).to(self._vae.dtype)
        set_vae_tiling(self._vae, height, width, self._tiling_min_pixels)
        decoded = self._vae.decode(denormalize(unpacked, self._vae), return_dict=False)[0]
        decoded = decoded[:, :, 0]
        pixels = (decoded.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)  # [n, H, W, 3]
        as_uint8 = (pixels * 255).round().to(torch.uint8)
        return [
            self._to_host(pixels[i] if wants_float else as_uint8[i])
            for i, wants_float in enumerate(float_output)
        ]

    def _to_host(self, pixels: torch.Tensor) -> np.ndarray:
        """Device -> host through pinned memory on CUDA (an asynchronous DMA copy)."""
        if self._device.type != "cuda":
            return pixels.numpy()
        staged = torch.empty(pixels.shape, dtype=pixels.dtype, pin_memory=True)
        staged.copy_(pixels, non_blocking=True)
        torch.cuda.current_stream(self._device).synchronize()
        return staged.numpy()

    def previews(self, denoised: torch.Tensor, height: int, width: int) -> np.ndarray:
        """[n, seq, channels * 4] x0 estimates -> uint8 [n, h, w, 3] at latent resolution."""
        unpacked = unpack(denoised, height, width, self._scale)
        return self._projector.project(denormalize(unpacked, self._vae))
