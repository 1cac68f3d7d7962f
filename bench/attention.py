"""Attention kernels at the sizes served: what a text-padding mask costs, kernel by kernel.

A call whose rows have prompts of different lengths pads the text to the longest, and
QwenImage's attention processor turns the padding into a boolean mask over the joint (text and
image) keys. PyTorch's flash kernel takes no mask, so such a call runs on another kernel. Here
one joint attention call of a few rows is timed with no mask and with a padding mask, through
each of PyTorch's own SDPA backends that `--attention-backend` can name (those of optional
packages, such as flash-attn or xformers, are left out), called as the processor calls it
(its layout changes included). A run on the GPU thereby says what padding costs per denoising
step (one such call per transformer block) and which backend to serve with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .flops import seconds_per_call

# diffusers backend names, as `--attention-backend` takes them ("native" is the default: SDPA
# with PyTorch's own choice of kernel).
BACKENDS = ("native", "_native_flash", "_native_efficient", "_native_cudnn", "_native_math")
ROWS = 4  # rows in the measured call; every row but the first has a shorter prompt when padded
ROUND_SECONDS = 0.3  # one timed round of back-to-back calls
ROUNDS = 3  # the best round counts


@dataclass(frozen=True, slots=True)
class JointAttention:
    """One joint attention call of a transformer block, for `rows` rows."""

    resolution: str
    image_tokens: int
    text_tokens: int  # the longest prompt's
    heads: int
    head_dim: int
    rows: int = ROWS

    @property
    def tokens(self) -> int:
        return self.image_tokens + self.text_tokens

    @property
    def flops(self) -> int:
        """Q K^T and A V over every key, masked or not (a multiply-add is 2 FLOPs)."""
        return 4 * self.rows * self.heads * self.tokens * self.tokens * self.head_dim

    def text_lengths(self) -> list[int]:
        """Each row's prompt length in the padded call: the longest, then shorter ones down to
        5/8 of it (with 4 rows)."""
        shortening = self.text_tokens // (2 * self.rows)
        return [self.text_tokens - row * shortening for row in range(self.rows)]


def padding_mask(call: JointAttention, device: torch.device) -> torch.Tensor:
    """[rows, 1, 1, tokens] booleans laid out as the processor builds them: text keys first (a
    row's padding masked out), then every image key."""
    positions = torch.arange(call.text_tokens, device=device)
    lengths = torch.tensor(call.text_lengths(), device=device)
    text = positions[None, :] < lengths[:, None]
    image = torch.ones(call.rows, call.image_tokens, dtype=torch.bool, device=device)
    return torch.cat([text, image], dim=1)[:, None, None, :]


def measure_attention(
    calls: Sequence[JointAttention],
    device: torch.device,
    dtype: torch.dtype,
    backends: Sequence[str] = BACKENDS,
    rounds: int = ROUNDS,
) -> list[dict[str, Any]]:
    """Each call with no mask and with a padding mask, through each backend: the seconds of one
    call and its TFLOP/s, or why the backend cannot run it."""
    points = []
    for call in calls:
        generator = torch.Generator(device).manual_seed(0)
        shape = (call.rows, call.tokens, call.heads, call.head_dim)  # diffusers' layout
        query, key, value = (
            torch.randn(shape, device=device, dtype=dtype, generator=generator) for _ in range(3)
        )
        for padded in (False, True):
            mask = padding_mask(call, device) if padded else None
            for backend in backends:
                point: dict[str, Any] = {
                    "resolution": call.resolution,
                    "rows": call.rows,
                    "tokens": call.tokens,
                    "padded": padded,
                    "backend": backend,
                }
                if backend == "native":
                    point["kernel"] = default_kernel(query, key, value, mask)
                try:
                    seconds = _best_seconds(_attention(backend, query, key, value, mask), rounds)
                except (RuntimeError, ValueError) as error:  # out of memory is a RuntimeError
                    point["error"] = str(error).strip().splitlines()[0][:200]
                    _release(device)
                else:
                    point["ms"] = 1000 * seconds
                    point["tflops"] = call.flops / seconds / 1e12
                points.append(point)
    return points


def default_kernel(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None
) -> str:
    """The kernel PyTorch's SDPA picks for these inputs (its private chooser; "unknown" if it
    moves)."""
    from torch.nn.attention import SDPBackend

    try:
        # SDPA's own layout: [rows, heads, tokens, head_dim].
        choice = torch._fused_sdp_choice(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), mask
        )
        return str(SDPBackend(choice).name).lower()
    except Exception:
        return "unknown"


def _attention(
    backend: str,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
) -> Callable[[], Any]:
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    name = AttentionBackendName(backend)
    return lambda: dispatch_attention_fn(query, key, value, attn_mask=mask, backend=name)


@torch.inference_mode()
def _best_seconds(call: Callable[[], Any], rounds: int) -> float:
    """Seconds per call: a warm-up call (kernel selection, cuDNN's plan), then `rounds` rounds
    of back-to-back calls of about ROUND_SECONDS each; the best round counts."""
    device = call().device
    return min(
        seconds_per_call(call, device, ROUND_SECONDS, between_syncs=4) for _ in range(rounds)
    )


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def summary_lines(attention: dict[str, Any], step_ms: dict[str, float]) -> list[str]:
    """The markdown: a table per resolution and mask, and what padding adds to a step of
    `attention["layers"]` blocks. `step_ms` is a measured step of as many rows, by resolution
    (for the share of the step), where the run has one."""
    layers, rows = attention["layers"], attention["rows"]
    lines = [
        f"Attention kernels: one joint attention call of {rows} rows, with every prompt of one "
        "length (no mask) and with prompts of different lengths (padded: a mask), through each "
        "of PyTorch's SDPA backends (`--attention-backend`); a step makes one such call per block "
        f"({layers}). *Padding per step* is {layers} x (padded - no mask).",
        "",
        "| resolution | backend (kernel SDPA picks) | no mask: ms | TFLOP/s | padded: ms | "
        "TFLOP/s | padding per step (ms) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    by_key = {(p["resolution"], p["backend"], p["padded"]): p for p in attention["points"]}
    resolutions = list(dict.fromkeys(p["resolution"] for p in attention["points"]))
    backends = list(dict.fromkeys(p["backend"] for p in attention["points"]))
    runnable = [b for b in backends if any("ms" in p for p in _of_backend(attention, b))]
    for resolution in resolutions:
        for backend in runnable:
            plain = by_key.get((resolution, backend, False), {})
            padded = by_key.get((resolution, backend, True), {})
            label = backend
            if "kernel" in plain:
                label += f" ({plain['kernel']} / {padded.get('kernel', '?')})"
            cost = (
                f"{layers * (padded['ms'] - plain['ms']):+.1f}"
                if "ms" in plain and "ms" in padded
                else "-"
            )
            lines.append(
                f"| {resolution} | {label} | {_cell(plain, 'ms')} | {_cell(plain, 'tflops')} | "
                f"{_cell(padded, 'ms')} | {_cell(padded, 'tflops')} | {cost} |"
            )
    unavailable = [b for b in backends if b not in runnable]
    if unavailable:
        lines += ["", f"Cannot run on this device: {', '.join(f'`{b}`' for b in unavailable)}."]
    lines += ["", *verdict_lines(attention, step_ms)]
    return lines


def verdict_lines(attention: dict[str, Any], step_ms: dict[str, float]) -> list[str]:
    """Per resolution: what padding costs with the default backend, and the fastest backend
    for a padded call."""
    layers, rows = attention["layers"], attention["rows"]
    lines = []
    for resolution in dict.fromkeys(p["resolution"] for p in attention["points"]):
        timed = [p for p in attention["points"] if p["resolution"] == resolution and "ms" in p]
        default = {p["padded"]: p for p in timed if p["backend"] == "native"}
        fastest_padded = min((p for p in timed if p["padded"]), key=lambda p: p["ms"], default=None)
        if len(default) < 2 or fastest_padded is None:
            continue
        added = layers * (default[True]["ms"] - default[False]["ms"])
        share = (
            f" ({added / step_ms[resolution]:.1%} of a measured {rows}-row step)"
            if resolution in step_ms
            else ""
        )
        fastest = (
            "the default is also the fastest with padding"
            if fastest_padded["backend"] == "native"
            else f"the fastest with padding is `{fastest_padded['backend']}` "
            f"({fastest_padded['ms']:.3g} ms a call against {default[True]['ms']:.3g})"
        )
        lines.append(
            f"- {resolution}: padding adds {added:+.1f} ms to a {rows}-row step with the default "
            f"backend{share}; {fastest}."
        )
    return lines


def _of_backend(attention: dict[str, Any], backend: str) -> list[dict[str, Any]]:
    return [point for point in attention["points"] if point["backend"] == backend]


def _cell(point: dict[str, Any], field: str) -> str:
    if field in point:
        return f"{point[field]:.3g}"
    return "n/a" if "error" in point else "-"
