"""Running the transformer fast on its device: CUDA math settings, the attention backend,
host-to-device copies that never stall the host, and `torch.compile` that survives a batch size
changing from step to step.

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
CompileScope = Literal["blocks", "model"]
# In "buckets" mode text is padded to a power of two of at least this many tokens: a static
# graph specialises on the text length (the rotary table is sliced by a Python int), so every
# length would be a graph; powers of two keep them few enough to compile them all at start-up
# (prompts go to 512 tokens). Dynamic graphs take any length.
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
        check_backend_takes_masks(attention_backend, device, next(transformer.parameters()).dtype)
        transformer.set_attention_backend(attention_backend)  # type: ignore[operator]


def check_backend_takes_masks(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    """Refuses a diffusers attention backend that takes no attention mask: Qwen-Image's
    processor passes one whenever prompts are padded (every call under "buckets", the memory
    probe, any batch of prompts of different lengths), so such a backend would fail those calls.

    Raises:
        ValueError: naming the setting, for a backend without masks (flash-attn, native flash,
            sage...). Other failures of the backend (not available here) propagate as they are.
    """
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    tokens = torch.zeros(1, 2, 1, 64, dtype=dtype, device=device)  # [batch, tokens, heads, dim]
    mask = torch.ones(1, 1, 1, 2, dtype=torch.bool, device=device)
    try:
        dispatch_attention_fn(tokens, tokens, tokens, attn_mask=mask, backend=backend)
    except ValueError as error:
        if "attn_mask" not in str(error):
            raise
        raise ValueError(
            f"attention_backend: {backend!r} takes no attention mask, which Qwen-Image passes for "
            "padded prompts; use native (PyTorch SDPA), _native_cudnn or _native_efficient"
        ) from error


def host_to_device(
    values: Sequence[float] | Sequence[Sequence[float]], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """`values` as a tensor on `device`, copied without making the host wait for the device.

    A copy from pageable host memory waits for all work queued on the device before it, so one
    per step would stall the host inside every step. On CUDA the values go through pinned memory
    with a non-blocking copy, which is queued behind that work instead (PyTorch's pinned-memory
    cache hands the buffer out again only after the copy has run). Elsewhere nothing is pinned.
    """
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


@dataclass(frozen=True, slots=True)
class TransformerRunner:
    """Calls the (possibly compiled) transformer, padding the batch in "buckets" mode."""

    call: Callable[..., Any]  # the transformer, possibly compiled (or with compiled blocks)
    mode: CompileMode  # "off", "buckets" or "dynamic" (the module docstring)
    buckets: tuple[int, ...]  # batch sizes compiled for, ascending

    @classmethod
    def build(
        cls,
        transformer: nn.Module,
        mode: CompileMode,
        buckets: Sequence[int],
        scope: CompileScope = "blocks",
    ) -> TransformerRunner:
        if mode == "off":
            return cls(transformer, mode, ())
        torch._dynamo.config.cache_size_limit = max(
            torch._dynamo.config.cache_size_limit, COMPILED_GRAPHS
        )
        dynamic = mode == "dynamic"
        if scope == "blocks":
            # Compiles every QwenImageTransformerBlock in place; the rest stays eager.
            transformer.compile_repeated_blocks(dynamic=dynamic)  # type: ignore[operator]
            return cls(transformer, mode, tuple(sorted(set(buckets))))
        return cls(torch.compile(transformer, dynamic=dynamic), mode, tuple(sorted(set(buckets))))

    def bucket(self, rows: int) -> int:
        """The compiled batch size a call of `rows` rows runs at (rows itself when off)."""
        if self.mode != "buckets":
            return rows
        return next((size for size in self.buckets if size >= rows), rows)

    @property
    def largest_call(self) -> int | None:
        """The most rows one call may have: the largest compiled batch in "buckets" mode (a
        larger call would compile while serving); None otherwise."""
        return max(self.buckets) if self.mode == "buckets" and self.buckets else None

    def probe_rows(self) -> tuple[int, int]:
        """Two batch sizes that run as calls of different sizes, for the memory probe (with
        buckets of 4 and 8, 1 and 2 rows would both run as 4)."""
        fewer = self.bucket(1)
        return fewer, self.bucket(fewer + 1)

    def text_tokens(self, tokens: int) -> int:
        """The text length a prompt of `tokens` tokens runs at (padded in "buckets" mode)."""
        return _text_bucket(tokens) if self.mode == "buckets" else tokens

    def __call__(
        self,
        hidden: torch.Tensor,
        timesteps: torch.Tensor,
        states: torch.Tensor,
        mask: torch.Tensor | None,
        rope_shapes: Sequence[tuple[int, int, int]],
    ) -> torch.Tensor:
        """The transformer's output for `hidden`, whose sequence holds one grid per entry of
        `rope_shapes` (the image's, then an edit row's references: the pipelines' img_shapes)."""
        rows = hidden.shape[0]
        padded = self.bucket(rows)
        if self.mode == "buckets":
            hidden, timesteps, states, mask = _pad(hidden, timesteps, states, mask, padded)
        output: torch.Tensor = self.call(
            hidden_states=hidden,
            timestep=timesteps,
            encoder_hidden_states=states,
            encoder_hidden_states_mask=mask,
            img_shapes=[list(rope_shapes)] * hidden.shape[0],
            return_dict=False,
        )[0]
        return output[:rows]

    def precompile(
        self,
        seq_len: int,
        channels: int,
        text_dim: int,
        rope_shape: tuple[int, int, int],
        max_text_tokens: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> float:
        """Compiles every shape a call at this resolution can take, so that serving never
        waits for the compiler; returns the seconds it took.

        Buckets: every batch bucket with every text bucket up to `max_text_tokens`. Dynamic:
        two batch sizes and two text lengths (the second call of a changed size is what makes
        that dimension dynamic), with a padding mask and without one (two graphs).
        """
        if self.mode == "off":
            return 0.0
        started = time.perf_counter()
        if self.mode == "buckets":
            shapes = [
                (rows, tokens, True)
                for rows in self.buckets
                for tokens in _text_buckets(max_text_tokens)
            ]
        else:
            shapes = [
                (rows, MIN_TEXT_BUCKET_TOKENS + rows, masked)
                for masked in (True, False)
                for rows in (1, 2)
            ]
        for rows, tokens, masked in shapes:
            with torch.inference_mode():
                self(
                    torch.zeros(rows, seq_len, channels, dtype=dtype, device=device),
                    torch.full((rows,), 0.5, dtype=dtype, device=device),
                    torch.zeros(rows, tokens, text_dim, dtype=dtype, device=device),
                    torch.ones(rows, tokens, dtype=torch.long, device=device) if masked else None,
                    [rope_shape],
                )
        seconds = time.perf_counter() - started
        log.info(
            "compiled the transformer (%s, %d shapes) in %.1fs", self.mode, len(shapes), seconds
        )
        return seconds


def _pad(
    hidden: torch.Tensor,
    timesteps: torch.Tensor,
    states: torch.Tensor,
    mask: torch.Tensor | None,
    rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pads the batch to `rows` with copies of the first row, and the text with masked-out
    positions to its bucket (a power of two, at least MIN_TEXT_BUCKET_TOKENS)."""
    if mask is None:  # always a mask, so a prompt of exactly a bucket's length adds no graph
        mask = torch.ones(states.shape[:2], dtype=torch.long, device=states.device)
    tokens = _text_bucket(states.shape[1])
    if tokens != states.shape[1]:
        states = torch.nn.functional.pad(states, (0, 0, 0, tokens - states.shape[1]))
        mask = torch.nn.functional.pad(mask, (0, tokens - mask.shape[1]))
    extra = rows - hidden.shape[0]
    if extra:
        hidden = torch.cat([hidden, hidden[:1].expand(extra, -1, -1)])
        timesteps = torch.cat([timesteps, timesteps[:1].expand(extra)])
        states = torch.cat([states, states[:1].expand(extra, -1, -1)])
        mask = torch.cat([mask, mask[:1].expand(extra, -1)])
    return hidden, timesteps, states, mask


def _text_bucket(tokens: int) -> int:
    """The padded text length: a power of two, at least MIN_TEXT_BUCKET_TOKENS."""
    return max(MIN_TEXT_BUCKET_TOKENS, 1 << (tokens - 1).bit_length())


def _text_buckets(max_tokens: int) -> list[int]:
    """Every text bucket a prompt of at most `max_tokens` tokens can fall in."""
    buckets = [MIN_TEXT_BUCKET_TOKENS]
    while buckets[-1] < _text_bucket(max_tokens):
        buckets.append(buckets[-1] * 2)
    return buckets
