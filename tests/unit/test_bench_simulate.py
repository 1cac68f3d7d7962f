"""bench/simulate.py: the real scheduler on simulated cost curves (no torch, no clock)."""

from __future__ import annotations

from bench.simulate import CURVES, main, simulate


def test_on_a_linear_curve_row_selection_cuts_latency_at_the_same_throughput() -> None:
    every_row = simulate("step-all", CURVES["linear"], load=0.5, requests=400)
    selected = simulate("step", CURVES["linear"], load=0.5, requests=400)
    assert selected.mean_s < 0.9 * every_row.mean_s
    assert selected.short_p95_s < 0.9 * every_row.short_p95_s
    assert selected.rows_per_step < every_row.rows_per_step  # it did leave rows out


def test_on_a_flat_curve_every_row_steps() -> None:
    every_row = simulate("step-all", CURVES["flat"], load=0.5, requests=400)
    selected = simulate("step", CURVES["flat"], load=0.5, requests=400)
    assert selected == every_row


def test_the_table_has_a_row_per_curve_load_and_policy(capsys: object) -> None:
    assert main(["--curves", "cpu", "--loads", "0.5", "--requests", "100"]) == 0
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    assert [line.split(" | ")[2] for line in out.splitlines()[2:]] == [
        "request",
        "step-all",
        "step",
    ]
