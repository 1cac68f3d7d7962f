"""How many rows fit on the device: a short start-up probe of the model's activation memory.

At start-up (CUDA only) one denoising call and one VAE decode run with 1 and then 2 rows at each
probe resolution; the difference of their peak memory is the cost of one more row. With what the
device has free, less a reserve, that gives the largest safe batch per resolution. Other
resolutions scale the per-row cost with their token count (attention kernels that never
materialise the score matrix keep activations linear in tokens). The scheduler then never forms
a batch above the limit, and out-of-memory back-off remains as a second line of defence.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RowCost:
    """Peak memory of one step at one resolution: `fixed + per_row * rows` bytes."""

    tokens: int  # image tokens per row at this resolution
    fixed_bytes: int
    per_row_bytes: int

    @classmethod
    def from_peaks(cls, tokens: int, one_row: int, two_rows: int) -> RowCost:
        per_row = max(1, two_rows - one_row)
        return cls(tokens, max(0, one_row - per_row), per_row)


@dataclass(frozen=True, slots=True)
class MemoryBudget:
    free_bytes: int  # free on the device once the model is loaded
    reserve_fraction: float  # kept free for fragmentation and everything not probed
    costs: tuple[RowCost, ...]  # probed resolutions

    def max_rows(self, tokens: int, cap: int) -> int:
        """The most rows (transformer batch, CFG counted twice) that fit at `tokens` tokens
        per row, at most `cap` and at least 1."""
        budget = self.free_bytes * (1 - self.reserve_fraction)
        nearest = min(self.costs, key=lambda cost: abs(cost.tokens - tokens))
        per_row = nearest.per_row_bytes * tokens / nearest.tokens
        return max(1, min(cap, int((budget - nearest.fixed_bytes) // per_row)))


def probe_costs(
    peak_bytes: Callable[[int, int, int], int], resolutions: list[tuple[int, int, int]]
) -> tuple[RowCost, ...]:
    """Measures `peak_bytes(width, height, rows)` at 1 and 2 rows for each (width, height,
    tokens) resolution."""
    costs = []
    for width, height, tokens in resolutions:
        cost = RowCost.from_peaks(
            tokens, peak_bytes(width, height, 1), peak_bytes(width, height, 2)
        )
        log.info(
            "memory probe %dx%d: %.2f GiB per row, %.2f GiB fixed",
            width,
            height,
            cost.per_row_bytes / 2**30,
            cost.fixed_bytes / 2**30,
        )
        costs.append(cost)
    return tuple(costs)
