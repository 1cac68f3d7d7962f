"""Running the transformer fast on its device: CUDA math settings, the attention backend, and
`torch.compile` that survives a batch size changing from step to step.

With step-level batching the rows in a call change at every boundary. `torch.compile` then
either marks the batch and text dimensions dynamic (one graph, generic kernels: "dynamic"), or
the call is padded up to a few fixed batch sizes and text lengths so each shape compiles once
with specialised kernels ("buckets"). Padding rows repeat a real row and are dropped from the
output; padded text positions are masked out; so neither changes any row's result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

log = logging.getLogger(__name__)

CompileMode = Literal["off", "buckets", "dynamic"]
# In "buckets" mode text is padded to a power of two of at least this many tokens: the
# transformer specialises on the text length (its rotary table is sliced by a Python int), so
# every length is a graph, and powers of two keep them few (Qwen-Image's template alone is
# about 100 tokens; prompts go to 512).
MIN_TEXT_BUCKET_TOKENS = 128
# Graphs kept per compiled function: batch buckets x text buckets x resolutions in use.
COMPILED_GRAPHS = 256


def configure_device(
    device: torch.device, transformer: nn.Module, attention_backend: str | None
) -> None:
    """TF32 matmuls and cuDNN on CUDA (free speed for the float32 parts: the VAE, norms) and,
    if asked, a diffusers attention backend other than PyTorch's SDPA."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if attention_backend:
        transformer.set_attention_backend(attention_backend)  # type: ignore[operator]


@dataclass(frozen=True, slots=True)
class TransformerRunner:
    """Calls the (possibly compiled) transformer, padding the batch in "buckets" mode."""

    call: Callable[..., Any]  # the transformer or its compiled form
    mode: CompileMode
    buckets: tuple[int, ...]  # batch sizes compiled for, ascending

    @classmethod
    def build(
        cls, transformer: nn.Module, mode: CompileMode, buckets: Sequence[int]
    ) -> TransformerRunner:
        if mode == "off":
            return cls(transformer, mode, ())
        torch._dynamo.config.cache_size_limit = max(
            torch._dynamo.config.cache_size_limit, COMPILED_GRAPHS
        )
        compiled = torch.compile(transformer, dynamic=mode == "dynamic")
        return cls(compiled, mode, tuple(sorted(set(buckets))))

    def bucket(self, rows: int) -> int:
        """The compiled batch size a call of `rows` rows runs at (rows itself when off)."""
        if self.mode != "buckets":
            return rows
        return next((size for size in self.buckets if size >= rows), rows)

    def __call__(
        self,
        hidden: torch.Tensor,
        timesteps: torch.Tensor,
        states: torch.Tensor,
        mask: torch.Tensor,
        rope_shape: tuple[int, int, int],
    ) -> torch.Tensor:
        rows = hidden.shape[0]
        padded = self.bucket(rows)
        if self.mode == "buckets":
            hidden, timesteps, states, mask = _pad(hidden, timesteps, states, mask, padded)
        output: torch.Tensor = self.call(
            hidden_states=hidden,
            timestep=timesteps,
            encoder_hidden_states=states,
            encoder_hidden_states_mask=mask,
            img_shapes=[[rope_shape]] * hidden.shape[0],
            return_dict=False,
        )[0]
        return output[:rows]

    def precompile(
        self,
        seq_len: int,
        channels: int,
        text_dim: int,
        rope_shape: tuple[int, int, int],
        dtype: torch.dtype,
        device: torch.device,
    ) -> float:
        """Compiles every bucket (or the dynamic graph) at one resolution before serving;
        returns the seconds it took."""
        if self.mode == "off":
            return 0.0
        started = time.perf_counter()
        sizes = self.buckets if self.mode == "buckets" else (1, 2)
        for rows in sizes:
            with torch.inference_mode():
                self(
                    torch.zeros(rows, seq_len, channels, dtype=dtype, device=device),
                    torch.full((rows,), 0.5, dtype=dtype, device=device),
                    torch.zeros(rows, MIN_TEXT_BUCKET_TOKENS, text_dim, dtype=dtype, device=device),
                    torch.ones(rows, MIN_TEXT_BUCKET_TOKENS, dtype=torch.long, device=device),
                    rope_shape,
                )
        seconds = time.perf_counter() - started
        log.info("compiled the transformer (%s, sizes %s) in %.1fs", self.mode, sizes, seconds)
        return seconds


def _pad(
    hidden: torch.Tensor,
    timesteps: torch.Tensor,
    states: torch.Tensor,
    mask: torch.Tensor,
    rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pads the batch to `rows` with copies of the first row, and the text with masked-out
    positions to its bucket (a power of two, at least MIN_TEXT_BUCKET_TOKENS)."""
    extra = rows - hidden.shape[0]
    if extra:
        hidden = torch.cat([hidden, hidden[:1].expand(extra, -1, -1)])
        timesteps = torch.cat([timesteps, timesteps[:1].expand(extra)])
        states = torch.cat([states, states[:1].expand(extra, -1, -1)])
        mask = torch.cat([mask, mask[:1].expand(extra, -1)])
    tokens = max(MIN_TEXT_BUCKET_TOKENS, 1 << (states.shape[1] - 1).bit_length())
    if tokens != states.shape[1]:
        states = torch.nn.functional.pad(states, (0, 0, 0, tokens - states.shape[1]))
        mask = torch.nn.functional.pad(mask, (0, tokens - mask.shape[1]))
    return hidden, timesteps, states, mask
