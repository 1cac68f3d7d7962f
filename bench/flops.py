"""The work in one denoising step, and what the hardware can do: the two halves of MFU.

FLOPs are counted by PyTorch (`torch.utils.flop_counter.FlopCounterMode`) as a copy of the
transformer runs on the meta device: every matmul and attention call is counted from its shapes,
nothing is computed or allocated, so the full 20 B Qwen-Image transformer is counted on any
machine in about two seconds. Only the transformer counts, because it is the denoising loop's
work; text encoding runs once per request and decoding once per image.

The peak is measured, not taken from a datasheet: the best rate of large square matmuls in the
engine's dtype on the engine's device, which is what the transformer's matmuls could reach.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Square matmul sizes tried for the peak; the best rate counts.
CUDA_PEAK_SIZES = (4096, 8192, 16384)
CPU_PEAK_SIZES = (512, 1024, 2048)
PEAK_SECONDS = 0.5  # one timed round of one size, after a warm-up call
PEAK_ROUNDS = 3  # rounds per size; the best counts (clocks ramp up, a shared CPU stalls)


@dataclass(frozen=True, slots=True)
class MatmulPeak:
    tflops: float  # best measured rate
    size: int  # n of the n x n x n matmul that reached it
    dtype: str


def transformer_step_flops(
    config: Mapping[str, Any],
    width: int,
    height: int,
    text_tokens: int,
    vae_scale_factor: int,
    rows: int = 1,
) -> int:
    """FLOPs of one transformer call of `rows` rows at `width` x `height`, as PyTorch counts
    them (multiply-adds count 2); `config` is the transformer's (`transformer.config`)."""
    from diffusers import QwenImageTransformer2DModel
    from imagegen_server.engine.sampling import LatentShape
    from torch.utils.flop_counter import FlopCounterMode

    shape = LatentShape.for_image(height, width, int(config["in_channels"]) // 4, vae_scale_factor)
    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel.from_config(dict(config))
        hidden = torch.zeros(rows, shape.seq_len, shape.channels * 4)
        timesteps = torch.full((rows,), 0.5)
        states = torch.zeros(rows, text_tokens, int(config["joint_attention_dim"]))
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        transformer(
            hidden_states=hidden,
            timestep=timesteps,
            encoder_hidden_states=states,
            encoder_hidden_states_mask=None,
            img_shapes=[[shape.rope_shape]] * rows,
            return_dict=False,
        )
    return int(counter.get_total_flops())


def measure_matmul_peak(
    device: torch.device, dtype: torch.dtype, sizes: Sequence[int] | None = None
) -> MatmulPeak:
    """The best rate of n x n matmuls on `device` in `dtype` over `sizes`."""
    if sizes is None:
        sizes = CUDA_PEAK_SIZES if device.type == "cuda" else CPU_PEAK_SIZES
    best = MatmulPeak(0.0, 0, str(dtype).removeprefix("torch."))
    for size in sizes:
        generator = torch.Generator(device).manual_seed(0)
        left = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
        right = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
        out = torch.empty(size, size, device=device, dtype=dtype)
        torch.matmul(left, right, out=out)  # warm-up: kernel selection
        for _ in range(PEAK_ROUNDS):
            rate = _matmul_rate(left, right, out)
            if rate > best.tflops:
                best = MatmulPeak(rate, size, best.dtype)
    return best


def _matmul_rate(left: torch.Tensor, right: torch.Tensor, out: torch.Tensor) -> float:
    """TFLOP/s of back-to-back square matmuls into `out`, timed for about PEAK_SECONDS."""
    seconds = seconds_per_call(
        lambda: torch.matmul(left, right, out=out), out.device, PEAK_SECONDS, between_syncs=8
    )
    return 2 * out.shape[0] ** 3 / seconds / 1e12


def seconds_per_call(
    call: Callable[[], object], device: torch.device, round_s: float, between_syncs: int
) -> float:
    """Mean seconds of back-to-back calls, timed for about `round_s`. The device is synchronised
    only every `between_syncs` calls, so the timer sees the device's work, not the host's."""
    _sync(device)
    calls = 0
    started = time.perf_counter()
    while True:
        for _ in range(between_syncs):
            call()
        calls += between_syncs
        _sync(device)
        elapsed = time.perf_counter() - started
        if elapsed >= round_s:
            return elapsed / calls


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
