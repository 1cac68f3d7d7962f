"""Flow-matching schedules, noise and latent packing for per-row denoising.

Every row carries its own sigma schedule, so rows with different step counts (or, for
image-to-image, different start points) share one transformer call. The values come from the
pipeline's own FlowMatchEulerDiscreteScheduler configuration, computed exactly as
`QwenImagePipeline.__call__` computes them, so a row's trajectory equals the pipeline's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
from diffusers.utils.torch_utils import randn_tensor

# Qwen-Image-Lightning's scheduler settings: a constant shift of 3 (ln 3 on the exponential
# time-shift scale, whatever the resolution) and no terminal stretch, as the distillation used.
LIGHTNING_SCHEDULER_OVERRIDES: dict[str, Any] = {
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "base_shift": float(np.log(3.0)),
    "max_shift": float(np.log(3.0)),
    "shift": 1.0,
    "shift_terminal": None,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
    "invert_sigmas": False,
    "stochastic_sampling": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
}


@dataclass(frozen=True, slots=True)
class SigmaSchedule:
    """One row's schedule: step i evaluates the model at timesteps[i] and moves by dts[i]."""

    timesteps: tuple[float, ...]  # float32 values passed (divided by 1000) to the transformer
    sigmas: tuple[float, ...]  # noise level before each step, plus the terminal one
    dts: tuple[float, ...]  # sigma[i + 1] - sigma[i], computed in float32 like the scheduler

    def __len__(self) -> int:
        return len(self.timesteps)

    def tail(self, steps: int) -> SigmaSchedule:
        """The last `steps` steps: where image-to-image starts for a given strength."""
        start = len(self) - steps
        return SigmaSchedule(self.timesteps[start:], self.sigmas[start:], self.dts[start:])


class ScheduleTable:
    """Computes and caches sigma schedules by (steps, image sequence length)."""

    def __init__(self, scheduler_config: dict[str, Any]) -> None:
        self._scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self._cache: dict[tuple[int, int], SigmaSchedule] = {}

    @property
    def config(self) -> Any:
        return self._scheduler.config

    def min_steps(self, image_seq_len: int) -> int:
        """The fewest steps with a finite schedule: Qwen-Image's terminal stretch divides by
        zero for a single step, so that scheduler needs two."""
        with np.errstate(invalid="ignore", divide="ignore"):  # the 0/0 is what we look for
            one_step = self.get(1, image_seq_len)
        return 1 if all(np.isfinite(one_step.sigmas)) else 2

    def get(self, steps: int, image_seq_len: int) -> SigmaSchedule:
        key = (steps, image_seq_len)
        if key not in self._cache:
            self._cache[key] = self._compute(steps, image_seq_len)
        return self._cache[key]

    def _compute(self, steps: int, image_seq_len: int) -> SigmaSchedule:
        config = self._scheduler.config
        mu = calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        self._scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        sigmas = self._scheduler.sigmas.to(torch.float32)
        return SigmaSchedule(
            timesteps=tuple(self._scheduler.timesteps.to(torch.float32).tolist()),
            sigmas=tuple(sigmas.tolist()),
            dts=tuple((sigmas[1:] - sigmas[:-1]).tolist()),
        )


@dataclass(frozen=True, slots=True)
class LatentShape:
    """The latent grid of one image: `channels` x `height` x `width` before 2x2 packing."""

    channels: int  # the VAE's latent channels
    height: int  # latent rows (image height / VAE scale factor, even)
    width: int  # latent columns (image width / VAE scale factor, even)

    @classmethod
    def for_image(
        cls, height: int, width: int, channels: int, vae_scale_factor: int
    ) -> LatentShape:
        # The VAE downsamples by vae_scale_factor and packing needs an even latent grid.
        return cls(
            channels=channels,
            height=2 * (height // (vae_scale_factor * 2)),
            width=2 * (width // (vae_scale_factor * 2)),
        )

    @property
    def seq_len(self) -> int:
        return (self.height // 2) * (self.width // 2)

    @property
    def rope_shape(self) -> tuple[int, int, int]:
        return (1, self.height // 2, self.width // 2)


def initial_noise(
    shape: LatentShape, generator: torch.Generator, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Packed noise [1, seq, channels*4] from the row's CPU generator (seeded with its seed).

    Drawn on the CPU whatever the device, so an image depends on its seed alone (not on the
    device, the batch or the order rows were admitted).
    """
    noise = randn_tensor(
        (1, 1, shape.channels, shape.height, shape.width), generator=generator, dtype=dtype
    )
    packed: torch.Tensor = QwenImagePipeline._pack_latents(
        noise, 1, shape.channels, shape.height, shape.width
    )
    return packed.to(device)


def pack(latents: torch.Tensor, shape: LatentShape) -> torch.Tensor:
    """[B, C, 1, H, W] VAE latents -> [B, seq, C*4] transformer tokens."""
    batch = latents.shape[0]
    packed: torch.Tensor = QwenImagePipeline._pack_latents(
        latents, batch, shape.channels, shape.height, shape.width
    )
    return packed


def unpack(latents: torch.Tensor, height: int, width: int, vae_scale_factor: int) -> torch.Tensor:
    """[B, seq, C*4] transformer tokens -> [B, C, 1, H, W] VAE latents."""
    unpacked: torch.Tensor = QwenImagePipeline._unpack_latents(
        latents, height, width, vae_scale_factor
    )
    return unpacked


def denormalize(latents: torch.Tensor, vae: Any) -> torch.Tensor:
    """Normalized latents (what the transformer works on) -> the VAE's latent scale."""
    mean, inverse_std = _latent_statistics(latents, vae)
    # Same arithmetic as QwenImagePipeline: latents / (1 / std) + mean.
    return latents / inverse_std + mean


def normalize(latents: torch.Tensor, vae: Any) -> torch.Tensor:
    """The VAE's latents -> normalized, as the image-to-image pipelines encode init images."""
    mean, inverse_std = _latent_statistics(latents, vae)
    return (latents - mean) * inverse_std


def _latent_statistics(latents: torch.Tensor, vae: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipelines' latents_mean and 1 / latents_std, cast before inverting as they do."""
    channels = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, channels, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, channels, 1, 1, 1)
    return mean.to(latents.device, latents.dtype), 1.0 / std.to(latents.device, latents.dtype)
