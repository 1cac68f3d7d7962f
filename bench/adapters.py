"""The adapter benchmark: what per-request LoRA adapters cost, and what mixing them in one batch
buys over one adapter set per batch.

    python -m bench adapters            # `make bench-adapters` (about 6 minutes on 2 cores)
    python -m bench adapters --quick    # a smoke check (about 2 minutes)

Three step-level servers, identical but for adapters, each under the same closed loops: 16
clients (the benchmark the issue asks for) and 4 (one per adapter), request i asking for
adapter i mod 4 at scale 1:

- *none*: the same clients with no adapter at all (the base model's cost);
- *shared*: `--adapter-batching shared`, the default: rows with different adapters share every
  transformer call, each row getting its own adapter's delta;
- *separate*: `--adapter-batching separate`: a batch holds rows of one adapter set only, the
  batching a server gets when it switches the model's adapter between batches. The switch
  itself costs nothing here, so this baseline is flattered.

The machine's speed drifts by tens of percent over minutes, so the three servers run side by
side (idle ones use no CPU) and take turns in rounds, in a rotating order; every figure pools
the rounds. Throughput is clients / mean latency (Little's law; see stats.py), each client's
first request of a round not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from .cli import add_engine_arguments, add_quick_argument, ints, resolution
from .launch import Metrics, ServerProcess
from .loads import ClosedLoop, LoadGenerator, Picker
from .machine import describe_machine
from .output import (
    add_output_arguments,
    fmt,
    read_json,
    resolve_outputs,
    results_header,
    write_block,
    write_json,
)
from .servers import (
    DEFAULT_MODEL,
    ServerOptions,
    ensure_model,
    measure,
    real_server_command,
    rotated,
    start_server,
)
from .stats import RequestRecord, closed_loop_stats, percentile, records_from_table, records_table
from .workloads import RequestClass

SYSTEMS = ("none", "shared", "separate")
ADAPTERS = ("ink", "neon", "sepia", "pastel")  # written by `tiny-model` next to the pipeline
JSON_NAME = "adapters.json"


@dataclass(frozen=True, slots=True)
class Sizing:
    rounds: int  # turns of each server
    window_s: float  # each turn's clients send for this long after their first request ...
    samples_per_client: float  # ... and on (up to 3 x as long) until this many were measured


FULL = Sizing(rounds=2, window_s=15.0, samples_per_client=1.5)
QUICK = Sizing(rounds=1, window_s=10.0, samples_per_client=0.5)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_quick_argument(parser, "one short round")
    add_output_arguments(parser, "only redo the markdown from JSON")
    add_engine_arguments(parser, DEFAULT_MODEL, "model directory (with adapters/)")
    parser.add_argument("--resolution", type=resolution, default="256x256")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument(
        "--clients", type=ints, default="16,4", help="closed-loop levels, comma-separated"
    )
    parser.add_argument("--max-batch-size", type=int, default=8)


def run(args: argparse.Namespace) -> int:
    resolve_outputs(args)
    if args.report_only:
        results = read_json(args.report_only)
    else:
        results = asyncio.run(run_bench(args))
        write_json(results, args.out / JSON_NAME)
    write_block(args.markdown, "bench-adapters", "bench-adapters", summary_lines(results))
    print("\n".join(summary_lines(results)))
    return 0


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    ensure_model(args.model)
    sizing = QUICK if args.quick else FULL
    width, height = args.resolution
    options = ServerOptions.from_args(args, 4 * max(args.clients), min(width, height))
    runs: list[dict[str, Any]] = []
    with ExitStack() as stack:
        servers: dict[str, ServerProcess] = {}
        for system in SYSTEMS:  # one at a time: each loads the model on both cores
            command = real_server_command(options, "step", _flags(args, system))
            servers[system] = stack.enter_context(await start_server(system, command))
        generators = {name: LoadGenerator(s.target, run_name=name) for name, s in servers.items()}
        try:
            for system, generator in generators.items():
                await generator.warm_up([_class_of(args, system, i) for i in range(4)])
            for round_number in range(sizing.rounds):
                for clients in args.clients:
                    for system in rotated(SYSTEMS, round_number):
                        server, generator = servers[system], generators[system]
                        pick = functools.partial(_class_of, args, system)
                        run = await closed_run(server, generator, pick, clients, args.steps, sizing)
                        runs.append({"system": system, "clients": clients, **run})
                        _print_run(round_number, runs[-1])
        finally:
            for generator in generators.values():
                await generator.close()
    machine = describe_machine(args.torch_threads, "auto")
    return {
        **results_header(args, machine),
        "settings": {
            "resolution": f"{width}x{height}",
            "steps": args.steps,
            "clients": args.clients,
            "adapters": list(ADAPTERS),
            "max_batch_size": args.max_batch_size,
            "rounds": sizing.rounds,
            "window_s": sizing.window_s,
        },
        "summaries": [
            summarize([run for run in runs if (run["system"], run["clients"]) == (system, n)])
            for n in args.clients
            for system in SYSTEMS
        ],
        "runs": runs,
        "wall_s": round(time.monotonic() - started, 1),
    }


def _flags(args: argparse.Namespace, system: str) -> list[str]:
    if system == "none":
        return []
    return [
        "--adapter-dir",
        str(args.model / "adapters"),
        "--preload-adapters",
        ",".join(ADAPTERS),
        "--max-loaded-adapters",
        str(len(ADAPTERS)),
        "--adapter-batching",
        system,
    ]


def _class_of(args: argparse.Namespace, system: str, client: int) -> RequestClass:
    width, height = args.resolution
    adapter = "" if system == "none" else ADAPTERS[client % len(ADAPTERS)]
    return RequestClass(width, height, args.steps, adapter)


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


def summary_lines(results: dict[str, Any]) -> list[str]:
    settings = results["settings"]
    machine = results["machine"]
    base = {
        summary["clients"]: summary["throughput_ips"]
        for summary in results["summaries"]
        if summary["system"] == "none"
    }
    lines = [
        f"Measured {machine['date']} with `{results['command']}` "
        f"({results['wall_s'] / 60:.1f} min{', quick mode' if results['quick'] else ''}); "
        f"{machine['cpu_model']}, {machine['logical_cores']} logical cores, torch "
        f"{machine['torch']}. Closed loops, {settings['resolution']}/{settings['steps']} steps, "
        f"adapters {', '.join(settings['adapters'])} (a quarter of the requests each), "
        f"`--max-batch-size {settings['max_batch_size']}`, {settings['rounds']} rounds of at "
        f"least {settings['window_s']:.0f} s per server and client count. Raw data: "
        f"[{JSON_NAME}](benchmarks/{JSON_NAME}).",
        "",
        "| adapters | clients | images/s | x none | p50 s | p95 s | rows/step | requests "
        "| failed | per round, images/s | other CPU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for data in results["summaries"]:
        none_ips = base.get(data["clients"]) or float("nan")
        lines.append(
            f"| {SYSTEM_NAMES[data['system']]} | {data['clients']} "
            f"| {data['throughput_ips']:.3f} | {data['throughput_ips'] / none_ips:.2f} "
            f"| {fmt(data['p50_s'])} | {fmt(data['p95_s'])} "
            f"| {fmt(data['rows_per_step'])} | {data['requests']} | {data['failed']} "
            f"| {', '.join(f'{value:.3f}' for value in data['per_round_ips'])} "
            f"| {data['background_cores']:.2f} |"
        )
    return lines


SYSTEM_NAMES = {
    "none": "none (base model)",
    "shared": "shared: 4 adapters mixed in every batch",
    "separate": "separate: one adapter per batch",
}


def _print_run(round_number: int, run: dict[str, Any]) -> None:
    stats = run["stats"]
    latency = stats["latency"]
    print(
        f"  round {round_number + 1} {run['system']:8} {run['clients']:2} clients: "
        f"{stats['throughput_ips']:.3f} img/s, p50 {fmt(latency['p50'])} s, "
        f"p95 {fmt(latency['p95'])} s, n={latency['count']}, "
        f"rows/step {fmt(run['rows_per_step'])}, other CPU {run['background_cores']:.2f}",
        flush=True,
    )
