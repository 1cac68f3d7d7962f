"""Servers measured side by side in rounds, and a bench command's run-or-report step, shared
by the benchmarks that compare servers under closed loops (`adapters`, `edits`).

The machine's speed drifts by tens of percent over minutes, so the servers run side by side
(idle ones use no CPU) and take turns in rounds, in a rotating order; every figure pools the
rounds.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from .launch import Metrics, ServerProcess
from .loads import ClosedLoop, LoadGenerator, Picker
from .output import fmt
from .servers import measure, rotated, start_server
from .stats import RequestRecord, closed_loop_stats, percentile, records_from_table, records_table
from .workloads import RequestClass


@dataclass(frozen=True, slots=True)
class Sizing:
    rounds: int  # turns of each server
    window_s: float  # each turn's clients send for this long after their first request ...
    samples_per_client: float  # ... and on (up to 3 x as long) until this many were measured


FULL = Sizing(rounds=2, window_s=15.0, samples_per_client=1.5)
QUICK = Sizing(rounds=1, window_s=10.0, samples_per_client=0.5)


# (system, request index) -> the request's class
SystemPicker = Callable[[str, int], RequestClass]


async def closed_rounds(
    commands: dict[str, list[str]],
    pick: SystemPicker,
    warm_up: int,
    clients: list[int],
    steps: int,
    sizing: Sizing,
    report: Callable[[int, dict[str, Any]], None],
) -> list[dict[str, Any]]:
    """Starts a server per system (`commands`), warms each up with its first `warm_up`
    request classes, then runs every closed loop of `clients` on each, in rotating rounds;
    returns the runs (each with its system and clients), passing each to `report`."""
    systems = list(commands)
    runs: list[dict[str, Any]] = []
    with ExitStack() as stack:
        servers: dict[str, ServerProcess] = {}
        for system, command in commands.items():  # one at a time: each loads the model
            servers[system] = stack.enter_context(await start_server(system, command))
        generators = {name: LoadGenerator(s.target, run_name=name) for name, s in servers.items()}
        try:
            for system, generator in generators.items():
                await generator.warm_up([pick(system, index) for index in range(warm_up)])
            for round_number in range(sizing.rounds):
                for count in clients:
                    for system in rotated(systems, round_number):
                        run = await closed_run(
                            servers[system],
                            generators[system],
                            functools.partial(pick, system),
                            count,
                            steps,
                            sizing,
                        )
                        runs.append({"system": system, "clients": count, **run})
                        report(round_number, runs[-1])
        finally:
            for generator in generators.values():
                await generator.close()
    return runs


async def closed_run(
    server: ServerProcess,
    generator: LoadGenerator,
    pick: Picker,
    clients: int,
    steps: int,
    sizing: Sizing,
) -> dict[str, Any]:
    """One turn: `clients` clients for about one cycle (their first requests, not counted)
    plus the window; request i is of class `pick(i)` (here: adapter i mod 4, a quarter of the
    load each), of `steps` steps."""

    async def drive(before: Metrics) -> tuple[list[RequestRecord], float]:
        duration_s = _cycle_s(before, steps, clients) + sizing.window_s
        load = ClosedLoop(
            clients=clients,
            duration_s=duration_s,
            min_samples=round(sizing.samples_per_client * clients),
            max_duration_s=3 * duration_s,
        )
        return await generator.closed_loop(load, pick)

    measured = await measure(server, drive)
    stats = closed_loop_stats(measured.records, clients, 0.0, measured.end_s)
    return {
        "stats": stats.to_dict(),
        "rows_per_step": measured.rows_per_step,
        "background_cores": round(measured.cpu.background, 3),
        "duration_s": round(measured.end_s, 2),
        "records": records_table(measured.records),
    }


def _cycle_s(samples: Metrics, steps: int, clients: int) -> float:
    """About one closed-loop cycle (every client's first request waits behind the others), from
    the server's step seconds per row so far."""
    seconds = samples.value("imagegen_stage_seconds_sum", stage="denoise_step")
    rows = samples.value("imagegen_batch_size_sum")
    per_row_step = seconds / rows if rows else 0.1
    return max(2.0, float(clients * steps * per_row_step))


def summaries(
    runs: list[dict[str, Any]], systems: Sequence[str], clients: Sequence[int]
) -> list[dict[str, Any]]:
    """`summarize` for each client count and system, in that order."""
    return [
        summarize([run for run in runs if (run["system"], run["clients"]) == (system, count)])
        for count in clients
        for system in systems
    ]


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Pools the rounds of one server and client count: throughput is clients / mean latency
    over all of them."""
    clients = runs[0]["clients"]
    latencies = sorted(
        record.latency_s
        for run in runs
        for record in records_from_table(run["records"])
        if record.ok and not record.first_of_client and record.latency_s is not None
    )
    rows = [run["rows_per_step"] for run in runs if run["rows_per_step"] is not None]
    return {
        "system": runs[0]["system"],
        "clients": clients,
        "throughput_ips": clients / statistics.fmean(latencies) if latencies else 0.0,
        "p50_s": percentile(latencies, 50),
        "p95_s": percentile(latencies, 95),
        "rows_per_step": statistics.fmean(rows) if rows else None,
        "requests": len(latencies),
        "failed": sum(sum(run["stats"]["failed"].values()) for run in runs),
        "background_cores": max(run["background_cores"] for run in runs),
        "per_round_ips": [round(run["stats"]["throughput_ips"], 4) for run in runs],
    }


def print_run(round_number: int, run: dict[str, Any]) -> None:
    """One run's line in the bench's progress output."""
    stats = run["stats"]
    latency = stats["latency"]
    print(
        f"  round {round_number + 1} {run['system']:8} {run['clients']:2} clients: "
        f"{stats['throughput_ips']:.3f} img/s, p50 {fmt(latency['p50'])} s, "
        f"p95 {fmt(latency['p95'])} s, n={latency['count']}, "
        f"rows/step {fmt(run['rows_per_step'])}, other CPU {run['background_cores']:.2f}",
        flush=True,
    )
