"""Cheap previews: a linear latent-to-RGB projection instead of a VAE decode on the hot path.

The projection (3 x channels, plus a bias) is fitted once at start-up by least squares against
the model's own VAE: a few random latents are decoded, the images are average-pooled down to the
latent grid, and each latent pixel's channels are regressed onto its RGB. This works for any VAE
the server loads, including the random-weight test model, without hard-coded factors.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLQwenImage

from .sampling import denormalize


class PreviewProjector:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.weight = weight  # [3, channels]
        self.bias = bias  # [3]

    @classmethod
    @torch.no_grad()
    def fit(
        cls,
        vae: AutoencoderKLQwenImage,
        vae_scale_factor: int,
        device: torch.device,
        grid: int = 16,
        samples: int = 2,
        seed: int = 0,
    ) -> PreviewProjector:
        """Fits the projection from `samples` random latents of `grid` x `grid`."""
        generator = torch.Generator("cpu").manual_seed(seed)
        normalized = torch.randn((samples, vae.config.z_dim, 1, grid, grid), generator=generator)
        latents = denormalize(normalized.to(device, vae.dtype), vae)
        images = vae.decode(latents, return_dict=False)[0][:, :, 0].float()
        pooled = F.avg_pool2d(images, vae_scale_factor)  # [samples, 3, grid, grid]
        inputs = latents[:, :, 0].float().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        targets = pooled.permute(0, 2, 3, 1).reshape(-1, 3)
        design = torch.cat([inputs, torch.ones_like(inputs[:, :1])], dim=1)
        solution = torch.linalg.lstsq(design.cpu(), targets.cpu()).solution  # [channels + 1, 3]
        return cls(weight=solution[:-1].T.to(device), bias=solution[-1].to(device))

    @torch.no_grad()
    def project(self, latents: torch.Tensor) -> np.ndarray:
        """[B, channels, 1, h, w] denormalized latents -> uint8 [B, h, w, 3] preview images."""
        rgb = torch.einsum("bchw,rc->brhw", latents[:, :, 0].float(), self.weight)
        rgb = rgb + self.bias.view(1, 3, 1, 1)
        pixels = ((rgb / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).cpu().numpy()
