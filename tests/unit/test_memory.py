"""The memory probe's arithmetic: from two measured peaks to the largest batch that fits."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from imagegen_server.base.config import Settings
from imagegen_server.base.types import BatchKey
from imagegen_server.engine.acceleration import TransformerRunner
from imagegen_server.engine.memory import (
    MemoryBudget,
    OutOfMemory,
    Peak,
    RowCost,
    images_that_fit,
    probe_costs,
)
from imagegen_server.engine.startup import row_limit

GIB = 2**30


def test_two_peaks_give_a_fixed_and_a_per_row_cost() -> None:
    cost = RowCost.from_peaks(4096, Peak(rows=1, bytes=3 * GIB), Peak(rows=2, bytes=5 * GIB))
    assert (cost.per_row_bytes, cost.fixed_bytes) == (2 * GIB, 1 * GIB)
    # Calls padded to compiled sizes of 4 and 8 rows: the same line from other points.
    padded = RowCost.from_peaks(4096, Peak(rows=4, bytes=9 * GIB), Peak(rows=8, bytes=17 * GIB))
    assert padded == cost


def test_rows_that_fit_leave_the_reserve_and_scale_with_tokens() -> None:
    budget = MemoryBudget(
        free_bytes=20 * GIB, reserve_fraction=0.1, costs=(RowCost(4096, 2 * GIB, 2 * GIB),)
    )
    assert budget.max_rows(4096, cap=64) == 8  # (18 - 2) GiB / 2 GiB per row
    assert budget.max_rows(8192, cap=64) == 4  # twice the tokens: twice the per-row cost
    assert budget.max_rows(4096, cap=6) == 6  # never above the configured batch size
    tight = MemoryBudget(
        free_bytes=2 * GIB, reserve_fraction=0.1, costs=(RowCost(4096, 2 * GIB, 2 * GIB),)
    )
    assert tight.max_rows(4096, cap=8) == 1  # one row is always allowed: out-of-memory backs off


def test_the_nearest_probed_resolution_is_the_reference() -> None:
    budget = MemoryBudget(
        free_bytes=40 * GIB,
        reserve_fraction=0.0,
        costs=(RowCost(4096, 0, 1 * GIB), RowCost(6889, 0, 4 * GIB)),
    )
    assert budget.max_rows(4096, cap=64) == 40
    assert budget.max_rows(6889, cap=64) == 10


def test_probe_measures_one_and_two_rows_per_resolution() -> None:
    calls = []

    def peak(width: int, height: int, rows: int) -> int:
        calls.append((width, height, rows))
        return (1 + rows) * GIB

    costs = probe_costs(peak, [(1024, 1024, 4096), (1328, 1328, 6889)])
    assert calls == [(1024, 1024, 1), (1024, 1024, 2), (1328, 1328, 1), (1328, 1328, 2)]
    assert [(c.tokens, c.per_row_bytes, c.fixed_bytes) for c in costs] == [
        (4096, GIB, GIB),
        (6889, GIB, GIB),
    ]


def test_the_probe_measures_the_calls_padding_really_makes() -> None:
    def peak(width: int, height: int, rows: int) -> int:
        return (1 + 2 * rows) * GIB

    (cost,) = probe_costs(peak, [(1024, 1024, 4096)], rows=(4, 8))
    assert (cost.per_row_bytes, cost.fixed_bytes) == (2 * GIB, 1 * GIB)


def test_the_vae_decode_has_its_own_budget() -> None:
    """A decode holds no step activations, so it gets the whole budget, by its own per-image
    cost; unprobed, a batch's finished images decode together."""
    budget = MemoryBudget(
        free_bytes=20 * GIB,
        reserve_fraction=0.0,
        costs=(RowCost(4300, 0, GIB),),
        vae_costs={"decode": (RowCost(4096, GIB, 3 * GIB),)},
    )
    assert budget.max_rows(4300, cap=64) == 20
    assert budget.max_vae_rows("decode", 4096, cap=64) == 6  # (20 - 1) // 3
    assert budget.max_vae_rows("decode", 4 * 4096, cap=64) == 1  # 12 GiB per image: one at a time
    assert budget.max_vae_rows("decode", 4096, cap=4) == 4
    unprobed = MemoryBudget(free_bytes=20 * GIB, reserve_fraction=0.0, costs=budget.costs)
    assert unprobed.max_vae_rows("decode", 4096, cap=8) == 8


def test_a_vae_call_is_judged_by_probed_sizes_on_its_side_of_the_tiling_threshold() -> None:
    untiled = RowCost(4096, 0, 3 * GIB)  # 1024x1024
    tiled = RowCost(16384, 0, 2 * GIB)  # 2048x2048 in tiles: cheaper than untiled 1024x1024
    budget = MemoryBudget(
        24 * GIB, 0.0, (), {"decode": (untiled, tiled)}, vae_tiling_min_tokens=16384
    )
    # 1920x1920 (14400 tokens) is untiled: judged by 1024x1024's cost, not the nearer tiled one.
    assert budget.max_vae_rows("decode", 14400, cap=8) == 2  # 24 // (3 * 14400 / 4096)
    assert budget.max_vae_rows("decode", 16384, cap=64) == 12  # 24 // 2
    only_tiled = MemoryBudget(24 * GIB, 0.0, (), {"decode": (tiled,)}, vae_tiling_min_tokens=16384)
    assert only_tiled.max_vae_rows("decode", 4096, cap=8) == 1  # nothing known: one at a time
    only_untiled = MemoryBudget(
        24 * GIB, 0.0, (), {"decode": (untiled,)}, vae_tiling_min_tokens=16384
    )
    assert only_untiled.max_vae_rows("decode", 16384, cap=8) == 2  # overstated: safe


def test_a_probe_that_does_not_fit_twice_counts_its_one_row_peak_per_row() -> None:
    def peak(width: int, height: int, rows: int) -> int:
        if rows > 1:
            raise OutOfMemory("two 2048x2048 decodes")
        return 14 * GIB

    (cost,) = probe_costs(peak, [(2048, 2048, 16384)], what="decode")
    assert (cost.per_row_bytes, cost.fixed_bytes) == (14 * GIB, 0)
    budget = MemoryBudget(26 * GIB, 0.1, (cost,), {"decode": (cost,)})
    assert budget.max_vae_rows("decode", 16384, cap=8) == 1


def test_a_probe_whose_single_row_does_not_fit_stops_the_start_naming_the_size() -> None:
    def peak(width: int, height: int, rows: int) -> int:
        raise OutOfMemory("out of memory")

    with pytest.raises(RuntimeError, match=r"a decode of 1 row\(s\) at 2048x2048 does not fit"):
        probe_costs(peak, [(2048, 2048, 16384)], what="decode")


def runner(mode: str, buckets: tuple[int, ...] = ()) -> TransformerRunner:
    return TransformerRunner(call=lambda **_: None, mode=mode, buckets=buckets)


@pytest.mark.parametrize(
    "mode,buckets,rows",
    [
        ("off", (), (1, 2)),
        ("dynamic", (), (1, 2)),
        ("buckets", (1, 2, 4, 8), (1, 2)),
        ("buckets", (4, 8), (4, 8)),
    ],
)
def test_probe_rows_differ_after_padding(
    mode: str, buckets: tuple[int, ...], rows: tuple[int, int]
) -> None:
    # Were 1 and 2 rows probed with buckets of 4 and 8, both would run as 4: no cost per row
    # would show, and every batch would seem to fit.
    assert runner(mode, buckets).probe_rows() == rows


def test_a_batch_fits_by_the_call_it_makes() -> None:
    padded = runner("buckets", (1, 2, 4, 8, 16)).bucket
    assert images_that_fit(6, most_images=8, rows_per_image=1, padded=padded) == 4  # 5 -> 8 rows
    assert images_that_fit(8, most_images=8, rows_per_image=2, padded=padded) == 4  # CFG: 2 rows
    assert images_that_fit(100, most_images=8, rows_per_image=2, padded=padded) == 8
    assert images_that_fit(1, most_images=8, rows_per_image=2, padded=padded) == 1  # at least 1
    unpadded = runner("off").bucket
    assert images_that_fit(6, most_images=8, rows_per_image=1, padded=unpadded) == 6


@pytest.fixture(scope="module")
def loaded_model(tiny_model: Path) -> Any:
    from imagegen_server.engine.model import load_model

    return load_model(str(tiny_model))


@pytest.mark.parametrize("mode,text", [("off", 300), ("buckets", 512)])
def test_a_row_is_costed_with_the_longest_prompt_as_it_runs(
    loaded_model: Any, mode: str, text: int
) -> None:
    # The probe once ran with 128 text tokens while prompts may have 300 (512 once padded to
    # a compiled length): it underrated every row's activations.
    from imagegen_server.engine.engine import Engine

    engine = Engine(
        loaded_model, prompt_cache_size=1, max_prompt_tokens=300, runner=runner(mode, (1, 2))
    )
    image_tokens = (64 // (2 * loaded_model.vae_scale_factor)) ** 2  # 2x2 patches of latents
    assert engine.tokens_per_row(64, 64) == image_tokens + text


def test_buckets_mode_holds_a_cfg_batch_to_half_the_largest_compiled_batch() -> None:
    """A CFG image is two rows: 5 CFG images would be a 10-row call, above the largest bucket
    (8), which nothing pads and which would compile while serving."""
    settings = Settings(
        model="m", compile="buckets", compile_buckets=[1, 2, 4, 8], max_batch_size=8
    )
    compiled: Any = SimpleNamespace(
        memory=None, engine=SimpleNamespace(runner=runner("buckets", (1, 2, 4, 8)))
    )
    assert row_limit(settings, compiled, BatchKey(height=64, width=64, cfg=True)) == 4
    assert row_limit(settings, compiled, BatchKey(height=64, width=64, cfg=False)) == 8
    eager: Any = SimpleNamespace(memory=None, engine=SimpleNamespace(runner=runner("off")))
    assert row_limit(settings, eager, BatchKey(height=64, width=64, cfg=True)) is None
