"""How many rows fit on the device: a short start-up probe of the model's activation memory.

At start-up (CUDA only) one denoising call and one VAE decode run with two batch sizes at each
probe resolution (1 and 2 rows, or the two smallest compiled batch sizes when calls are padded to
them), with the longest prompt allowed; the difference of their peak memory is the cost of one
more row. With what the device has free, less a reserve, that gives the largest safe batch per
resolution. Other resolutions scale the per-row cost with their token count (attention kernels
that never materialise the score matrix keep activations linear in tokens). A batch is judged by
the call it really makes: CFG doubles its rows, and padding rounds them up to a compiled size.
The scheduler then never forms a batch above the limit, and out-of-memory back-off remains as a
second line of defence.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

log = logging.getLogger(__name__)


class Peak(NamedTuple):
    """Peak memory of a step and a decode with `rows` transformer rows."""

    rows: int
    bytes: int


@dataclass(frozen=True, slots=True)
class RowCost:
    """Peak memory of one step at one resolution: `fixed + per_row * rows` bytes."""

    tokens: int  # tokens per row at this resolution (image and text)
    fixed_bytes: int
    per_row_bytes: int

    @classmethod
    def from_peaks(cls, tokens: int, fewer: Peak, more: Peak) -> RowCost:
        per_row = max(1, (more.bytes - fewer.bytes) // (more.rows - fewer.rows))
        return cls(tokens, max(0, fewer.bytes - per_row * fewer.rows), per_row)


@dataclass(frozen=True, slots=True)
class MemoryBudget:
    free_bytes: int  # free on the device once the model is loaded
    reserve_fraction: float  # kept free for fragmentation and everything not probed
    costs: tuple[RowCost, ...]  # probed resolutions

    def max_rows(self, tokens: int, cap: int) -> int:
        """The most transformer rows that fit at `tokens` tokens per row, at most `cap` and at
        least 1."""
        budget = self.free_bytes * (1 - self.reserve_fraction)
        nearest = min(self.costs, key=lambda cost: abs(cost.tokens - tokens))
        per_row = nearest.per_row_bytes * tokens / nearest.tokens
        return max(1, min(cap, int((budget - nearest.fixed_bytes) // per_row)))


def probe_costs(
    peak_bytes: Callable[[int, int, int], int],
    resolutions: list[tuple[int, int, int]],
    rows: tuple[int, int] = (1, 2),
) -> tuple[RowCost, ...]:
    """Measures `peak_bytes(width, height, rows)` at both row counts for each (width, height,
    tokens) resolution."""
    costs = []
    for width, height, tokens in resolutions:
        fewer, more = (Peak(count, peak_bytes(width, height, count)) for count in rows)
        cost = RowCost.from_peaks(tokens, fewer, more)
        log.info(
            "memory probe %dx%d: %.2f GiB per row, %.2f GiB fixed",
            width,
            height,
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
