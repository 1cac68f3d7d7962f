"""How many rows fit on the device: a short start-up probe of the model's activation memory.

At start-up (CUDA only) the probe measures, at each probe resolution, the peak memory of one
denoising call with two batch sizes (1 and 2 rows, or the two smallest compiled batch sizes when
calls are padded to them), with the longest prompt allowed, and of one VAE decode and one VAE
encode of 1 and 2 images. The difference of two peaks is the cost of one more row. The three are
measured apart because they never hold memory at once (a step's activations are freed before its
finished rows decode; init images encode before their rows' first step) and because the VAE, not
the transformer, is the larger: a 1024x1024 decode of Qwen-Image's VAE takes gigabytes per
image. With what the device has free, less a reserve, that gives the largest safe batch per
resolution, and how many images one VAE call decodes or encodes.
Other resolutions scale the per-row cost with their token count (attention kernels that never
materialise the score matrix keep activations linear in tokens; the VAE is linear in pixels). A
batch is judged by the call it really makes: CFG doubles its rows, and padding rounds them up to
a compiled size. The scheduler then never forms a batch above the limit, and out-of-memory
back-off remains as a second line of defence.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

log = logging.getLogger(__name__)


class Peak(NamedTuple):
    """Peak memory of one probed call (a denoising step, a VAE decode or encode) of `rows` rows."""

    rows: int  # in the probed call
    bytes: int  # its peak above what was allocated before it


@dataclass(frozen=True, slots=True)
class RowCost:
    """Peak memory of one step at one resolution: `fixed + per_row * rows` bytes."""

    tokens: int  # tokens per row at this resolution (image and text)
    fixed_bytes: int  # what the call takes whatever its rows
    per_row_bytes: int  # what each row adds

    @classmethod
    def from_peaks(cls, tokens: int, fewer: Peak, more: Peak) -> RowCost:
        per_row = max(1, (more.bytes - fewer.bytes) // (more.rows - fewer.rows))
        return cls(tokens, max(0, fewer.bytes - per_row * fewer.rows), per_row)


@dataclass(frozen=True, slots=True)
class MemoryBudget:
    """What the start-up probe measured, and the limits it implies."""

    free_bytes: int  # free on the device once the model is loaded
    reserve_fraction: float  # kept free for fragmentation and everything not probed
    costs: tuple[RowCost, ...]  # a denoising call, at the probed resolutions
    # VAE calls by kind ("decode", "encode"), tokens = image tokens; a kind left out = unknown
    vae_costs: dict[str, tuple[RowCost, ...]] = field(default_factory=dict)
    # Images of at least this many tokens go through the VAE in tiles (0 = never): far cheaper,
    # so a size is judged only by probed sizes on its own side of the threshold.
    vae_tiling_min_tokens: int = 0

    def max_rows(self, tokens: int, cap: int) -> int:
        """The most transformer rows that fit at `tokens` tokens per row, at most `cap` and at
        least 1."""
        return self._fit(self.costs, tokens, cap)

    def max_vae_rows(self, kind: str, image_tokens: int, cap: int) -> int:
        """The most images one VAE call of `kind` takes at `image_tokens` latent tokens per
        image, at most `cap` and at least 1; `cap` when that kind was not probed."""
        costs = self.vae_costs.get(kind)
        if not costs:
            return cap
        if self.vae_tiling_min_tokens:
            tiled = image_tokens >= self.vae_tiling_min_tokens
            alike = tuple(c for c in costs if (c.tokens >= self.vae_tiling_min_tokens) == tiled)
            if not alike and not tiled:
                return 1  # only tiled calls were probed: they say nothing of an untiled one
            costs = alike or costs  # untiled costs, scaled up, overstate a tiled call: safe
        return self._fit(costs, image_tokens, cap)

    def _fit(self, costs: tuple[RowCost, ...], tokens: int, cap: int) -> int:
        budget = self.free_bytes * (1 - self.reserve_fraction)
        nearest = min(costs, key=lambda cost: abs(cost.tokens - tokens))
        per_row = nearest.per_row_bytes * tokens / nearest.tokens
        return max(1, min(cap, int((budget - nearest.fixed_bytes) // per_row)))


_PROBE_HINTS = {
    "decode": ", or set vae_tiling_min_pixels",
    "encode": ", or set vae_tiling_min_pixels",
    "step": ", or lower max_prompt_tokens",
}


class OutOfMemory(Exception):
    """What a `peak_bytes` probe raises when its call does not fit on the device."""


def probe_costs(
    peak_bytes: Callable[[int, int, int], int],
    resolutions: list[tuple[int, int, int]],
    rows: tuple[int, int] = (1, 2),
    what: str = "step",
) -> tuple[RowCost, ...]:
    """Measures `peak_bytes(width, height, rows)` at both row counts for each (width, height,
    tokens) resolution.

    When the larger count does not fit, the smaller count's peak is spread over its rows as the
    cost of each (no fixed part: the most a row can cost), so that resolution gets the smaller
    count.

    Raises:
        RuntimeError: the smaller count does not fit either; nothing of that size can run.
    """
    costs = []
    for width, height, tokens in resolutions:
        try:
            fewer = Peak(rows[0], peak_bytes(width, height, rows[0]))
        except OutOfMemory as error:
            raise RuntimeError(
                f"memory probe: a {what} of {rows[0]} row(s) at {width}x{height} does not fit on "
                f"this device; serve smaller sizes (max_width/max_height, default_width/"
                f"default_height, memory_probe_sizes){_PROBE_HINTS.get(what, '')}"
            ) from error
        try:
            more = Peak(rows[1], peak_bytes(width, height, rows[1]))
        except OutOfMemory:
            log.warning(
                "memory probe %dx%d: a %s of %d rows does not fit", width, height, what, rows[1]
            )
            more = Peak(rows[0] + 1, fewer.bytes * (rows[0] + 1) // rows[0])
        cost = RowCost.from_peaks(tokens, fewer, more)
        log.info(
            "memory probe %dx%d %s: %.2f GiB per row, %.2f GiB fixed",
            width,
            height,
            what,
            cost.per_row_bytes / 2**30,
            cost.fixed_bytes / 2**30,
        )
        costs.append(cost)
    return tuple(costs)


def images_that_fit(
    fitting_rows: int, most_images: int, rows_per_image: int, padded: Callable[[int], int]
) -> int:
    """The most images of a batch (at most `most_images`, at least 1) whose transformer call
    fits in `fitting_rows` rows: each image is `rows_per_image` rows (2 with CFG), and the call
    runs at `padded(rows)` rows (a compiled batch size)."""
    for images in range(most_images, 1, -1):
        if padded(images * rows_per_image) <= fitting_rows:
            return images
    return 1
