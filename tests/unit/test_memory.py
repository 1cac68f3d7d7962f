"""The memory probe's arithmetic: from two measured peaks to the largest batch that fits."""

from __future__ import annotations

from imagegen_server.memory import MemoryBudget, RowCost, probe_costs

GIB = 2**30


def test_two_peaks_give_a_fixed_and_a_per_row_cost() -> None:
    cost = RowCost.from_peaks(tokens=4096, one_row=3 * GIB, two_rows=5 * GIB)
    assert (cost.per_row_bytes, cost.fixed_bytes) == (2 * GIB, 1 * GIB)


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
