"""The benchmark's helpers (bench/stats.py, bench/plan.py, bench/servers.py, bench/launch.py,
bench/targets.py, bench/cli.py): pure functions, no timing."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root holds bench/

from bench.cli import command_line, subset_of
from bench.launch import parse_metrics
from bench.plan import FULL, closed_plan, open_plan
from bench.servers import DEFAULT_MODEL, describe_model, quiet_period_s, rotated, rows_per_step
from bench.stats import (
    CUT,
    OK,
    RequestRecord,
    closed_loop_stats,
    open_loop_stats,
    percentile,
    records_from_table,
    records_table,
    summarize_latencies,
)
from bench.targets import evaluate
from bench.workloads import mix_workload, parse_resolution


def record(
    index: int,
    issued: float,
    finished: float | None,
    code: str | None = None,
    steps: int = 8,
    first: bool = False,
    queued: float | None = 0.1,
) -> RequestRecord:
    return RequestRecord(
        index=index,
        steps=steps,
        label=f"256x256/{steps}",
        issued_s=issued,
        first_of_client=first,
        finished_s=finished,
        code=code or (OK if finished is not None else CUT),
        queued_s=queued,
    )


def test_percentile_interpolates_linearly_like_numpy() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 100) == 4.0
    assert percentile(values, 95) == pytest.approx(3.85)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


def test_percentile_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_unfinished_requests_make_high_percentiles_unknown() -> None:
    summary = summarize_latencies([1.0] * 9, unfinished=1)
    assert summary.p50 == 1.0
    assert summary.p95 is None and summary.p99 is None and summary.max is None
    assert summary.mean is None  # a mean over a censored sample would understate
    assert summary.count == 9 and summary.unfinished == 1


def test_closed_loop_counts_the_window_and_drops_each_clients_first_request() -> None:
    records = [
        record(0, 0.0, 3.0, first=True),  # in the window, but a warm-up request
        record(1, 1.0, 4.0),
        record(2, 2.0, 6.0),
        record(3, 0.5, 1.5, first=True),  # a warm-up request before the window
        record(4, 6.0, None),  # cut at the end
        record(5, 3.0, 3.2, code="UNAVAILABLE"),
    ]
    stats = closed_loop_stats(records, clients=2, warm_s=2.0, end_s=7.0)
    assert stats.throughput_ips == pytest.approx(2 / 3.5)  # Little's law: clients / mean latency
    assert stats.window_throughput_ips == pytest.approx(3 / 5.0)  # 0, 1, 2 completed in [2, 7]
    # Every non-first request counts for latency, inside the window or not.
    assert stats.latency.count == 2
    assert stats.latency.p50 == pytest.approx(3.5)  # latencies 3 and 4
    assert stats.failed == {"UNAVAILABLE": 1}
    assert stats.cut == 1


def test_open_loop_measures_arrivals_after_warm_up_and_reports_step_counts() -> None:
    records = [
        record(0, 0.5, 1.5, steps=4),  # arrived during warm-up
        record(1, 1.0, 2.0, steps=4),
        record(2, 2.0, 5.0, steps=8, queued=0.5),
        record(3, 3.0, None, steps=8),  # cut at the drain cap
    ]
    stats = open_loop_stats(records, warm_s=1.0, arrivals_end_s=4.0)
    assert stats.throughput_ips == pytest.approx(3 / 4.5)  # 3 done from 0.5 (arrival) to 5.0
    assert stats.window_throughput_ips == pytest.approx(2 / 3.0)  # completions at 1.5 and 2.0
    assert stats.latency.count == 2 and stats.latency.unfinished == 1
    assert stats.latency_by_steps[4].p95 == pytest.approx(1.0)
    assert stats.latency_by_steps[8].unfinished == 1
    assert stats.queue_mean_s == pytest.approx(0.3)
    assert stats.queue_mean_by_steps[8] == pytest.approx(0.5)
    assert math.isclose(stats.window_s, 3.0)


def test_closed_plan_warms_up_for_one_cycle() -> None:
    plan = closed_plan(clients=64, expected_ips=2.0, max_batch=8, sizing=FULL)
    rate = FULL.rate_discount * 2.0
    assert plan.warm_s == pytest.approx(64 / rate)
    # The window holds at least two bursts of 8 completions after the warm-up.
    assert plan.load.duration_s - plan.warm_s >= 2 * 8 / rate


def test_scaled_sizing_shortens_runs_within_floors() -> None:
    half = FULL.scaled(0.5)
    assert half.open_arrival_s == max(4.0, FULL.open_arrival_s / 2)
    assert FULL.scaled(0.01).closed_window_images == 5
    assert FULL.scaled(1.0) == FULL


def test_open_plan_offers_a_fraction_of_the_limit() -> None:
    plan = open_plan(0.5, limit_ips=2.0, sizing=FULL)
    assert plan.load.rate_ips == pytest.approx(1.0)
    assert plan.load.arrivals == max(FULL.open_min_arrivals, round(1.0 * FULL.open_arrival_s))


def test_rows_per_step_from_histogram_deltas() -> None:
    before = parse_metrics("imagegen_batch_size_sum 10.0\nimagegen_batch_size_count 5.0\n")
    after = parse_metrics(
        "# HELP imagegen_batch_size rows\nimagegen_batch_size_sum 40.0\n"
        'imagegen_batch_size_count 10.0\nimagegen_stage_seconds_sum{stage="x"} 1.5\n'
    )
    assert rows_per_step(before, after) == pytest.approx(6.0)
    assert after.value("imagegen_stage_seconds_sum", stage="x") == 1.5
    assert after.value("imagegen_stage_seconds_sum", stage="y") == 0.0
    assert rows_per_step(after, after) is None


def test_the_servers_histograms_read_through_the_prometheus_parser() -> None:
    registry = CollectorRegistry()
    stages = Histogram("imagegen_stage_seconds", "stage time", ["stage"], registry=registry)
    batches = Histogram("imagegen_batch_size", "rows", buckets=(1, 2, 4, 8), registry=registry)
    for seconds in (0.5, 1.5):
        stages.labels("denoise_step").observe(seconds)
    stages.labels("vae_decode").observe(9.0)  # another stage: not a step
    for rows in (4, 2):
        batches.observe(rows)
    samples = parse_metrics(generate_latest(registry).decode())
    assert quiet_period_s(samples) == pytest.approx(2.0)  # two mean steps of 1 s
    assert rows_per_step(parse_metrics(""), samples) == pytest.approx(3.0)


def test_results_name_the_make_target_or_the_command_that_made_them() -> None:
    assert command_line(["batching"]) == "make bench"
    assert command_line(["mfu", "--quick"]) == "python -m bench mfu --quick"
    assert command_line(["simulate"]) == "python -m bench simulate"


def test_a_subset_option_comes_back_in_the_order_the_benchmarks_run_it() -> None:
    parse = subset_of(["naive", "request", "step"])
    assert parse("step, naive") == ["naive", "step"]
    for wrong in ("steps", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(wrong)


def test_mix_workload_has_every_size_with_every_step_count() -> None:
    mix = mix_workload([parse_resolution("256x256"), parse_resolution("192x192")], [4, 8])
    assert len(mix.classes) == 4
    assert mix.step_counts == (4, 8)
    assert mix.class_of(7, seed=1) == mix.class_of(7, seed=1)
    with pytest.raises(ValueError):
        parse_resolution("256")


def test_records_round_trip_through_the_json_table() -> None:
    records = [record(0, 0.0, 1.0, first=True), record(1, 0.5, None, steps=4)]
    again = records_from_table(records_table(records))
    assert again == records


@pytest.mark.parametrize(
    ("options", "label"),
    [
        ({"adapter": "ink"}, "256x256/4+ink"),
        ({"variant": "lightning-4", "guidance_scale": 4.0}, "256x256/4+cfg@lightning-4"),
        ({"references": 2}, "256x256/4+2ref"),
    ],
)
def test_records_of_every_request_class_keep_their_step_count(
    options: dict[str, Any], label: str
) -> None:
    from bench.workloads import RequestClass

    cls = RequestClass(256, 256, 4, **options)
    assert cls.label == label
    stored = RequestRecord(index=0, steps=cls.steps, label=cls.label, issued_s=0.0)
    assert records_from_table(records_table([stored])) == [stored]


def test_systems_take_turns_going_first() -> None:
    systems = ["naive", "request", "step"]
    orders = [rotated(systems, turn) for turn in range(4)]
    assert [order[0] for order in orders] == ["naive", "request", "step", "naive"]
    assert all(sorted(order) == sorted(systems) for order in orders)


def test_the_model_line_names_the_preset(tmp_path: Path) -> None:
    (tmp_path / "random_weights.json").write_text('{"preset": "full", "seed": 0}')
    assert "`full` preset" in describe_model(tmp_path)
    assert "`bench` preset" in describe_model(DEFAULT_MODEL)
    assert str(tmp_path.parent) in describe_model(tmp_path.parent)


def saturated_results(device: str, ratio: float) -> dict[str, object]:
    """The least a results dict needs for the saturation target: one step-level run."""
    run = {
        "system": "step",
        "workload": "single",
        "kind": "closed",
        "clients": 64,
        "fraction": None,
        "stats": {"throughput_ips": ratio * 2.0},
        "rows_per_step": 8.0,
        "cpu": {"background": 0.0},
    }
    return {
        "machine": {"device": device},
        "settings": {"clients": [1, 64], "max_batch_size": 8, "mix_steps": [4, 8]},
        "limit": {"limit_ips": 2.0, "best_batch_size": 8, "sweep": [], "latency_s": 1.0},
        "runs": [run],
    }


@pytest.mark.parametrize(("device", "passed"), [("cpu", True), ("cuda:0", False)])
def test_the_saturation_bar_is_higher_on_a_gpu(device: str, passed: bool) -> None:
    saturated = evaluate(saturated_results(device, ratio=0.93))[0]
    assert saturated.name == "saturated throughput"
    assert saturated.value == pytest.approx(0.93)
    assert saturated.passed is passed
    assert saturated.threshold == (0.95 if device.startswith("cuda") else 0.9)
