"""A batch: the rows that share transformer calls, with their latents in one tensor.

Rows join at `add` and leave at a step boundary (finished, failed or cancelled); the latents of
the rows that stay are carried over untouched, so leaving changes no other row's pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from ..base.types import BatchKey
from .denoise import Row
from .sampling import LatentShape

T = TypeVar("T")


@dataclass(slots=True, eq=False)
class Batch:
    key: BatchKey  # what every row has in common (size, CFG)
    shape: LatentShape  # one row's latent grid at the key's size
    rows: list[Row] = field(default_factory=list)  # in the order of `latents`
    latents: torch.Tensor | None = None  # [rows, seq, channels * 4]; None while empty
    # Padded text states + mask (None: no padding) for a call of every row; rebuilt when the
    # rows change.
    text: tuple[torch.Tensor, torch.Tensor | None] | None = None
    # Edit batches: each reference's token grid (frames, rows, columns), after the image's.
    reference_grids: tuple[tuple[int, int, int], ...] = ()

    @property
    def rope_shapes(self) -> list[tuple[int, int, int]]:
        """The token grids of a row's sequence: its image's, then its references' (the
        pipelines' img_shapes for one row)."""
        return [self.shape.rope_shape, *self.reference_grids]

    def append(self, rows: list[Row], latents: list[torch.Tensor]) -> None:
        """New rows join at the end, starting from `latents` (one [1, seq, channels * 4] each)."""
        self.rows += rows
        self.latents = torch.cat(([self.latents] if self.latents is not None else []) + latents)
        self.text = None

    def update(self, positions: list[int], latents: torch.Tensor) -> None:
        """The rows at `positions` (in batch order) took a step to `latents`."""
        assert self.latents is not None
        if len(positions) == len(self.rows):  # every row
            self.latents = latents
        else:
            self.latents[positions] = latents
        for position in positions:
            self.rows[position].step += 1

    def remove(self, leaving: Callable[[Row], bool]) -> bool:
        """Drops the rows for which `leaving(row)` holds, with their latents; returns whether
        any left."""
        keep = [position for position, row in enumerate(self.rows) if not leaving(row)]
        if len(keep) == len(self.rows):
            return False
        self.text = None
        self.rows = [self.rows[position] for position in keep]
        self.latents = self.latents[keep] if keep and self.latents is not None else None
        return True


def count_adapter_rows(rows: list[Row]) -> dict[str, int]:
    """How many of `rows` use each adapter (by name)."""
    counts: dict[str, int] = {}
    for row in rows:
        for spec in row.adapters:
            counts[spec.name] = counts.get(spec.name, 0) + 1
    return counts


def count_variant_rows(rows: list[Row]) -> dict[str, int]:
    """How many of `rows` run as each variant (none on a server without variants)."""
    counts: dict[str, int] = {}
    for row in rows:
        if row.variant:
            counts[row.variant] = counts.get(row.variant, 0) + 1
    return counts


def chunks(items: list[T], size: int | None) -> Iterator[list[T]]:
    """`items` in consecutive pieces of at most `size` (None: all in one)."""
    step = size or len(items)
    for start in range(0, len(items), step):
        yield items[start : start + step]
