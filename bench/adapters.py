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
import time
from typing import Any

from .cli import add_engine_arguments, add_quick_argument, ints, resolution
from .machine import describe_machine
from .output import add_output_arguments, fmt, results_header, run_and_report
from .rounds import FULL, QUICK, closed_rounds, print_run, summaries
from .servers import (
    DEFAULT_MODEL,
    ServerOptions,
    ensure_model,
    real_server_command,
)
from .workloads import RequestClass

SYSTEMS = ("none", "shared", "separate")
ADAPTERS = ("ink", "neon", "sepia", "pastel")  # written by `tiny-model` next to the pipeline
JSON_NAME = "adapters.json"


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
    return run_and_report(
        args, JSON_NAME, "bench-adapters", lambda: asyncio.run(run_bench(args)), summary_lines
    )


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    ensure_model(args.model)
    sizing = QUICK if args.quick else FULL
    width, height = args.resolution
    options = ServerOptions.from_args(args, 4 * max(args.clients), min(width, height))
    commands = {
        system: real_server_command(options, "step", _flags(args, system)) for system in SYSTEMS
    }
    pick = functools.partial(_class_of, args)
    runs = await closed_rounds(commands, pick, 4, args.clients, args.steps, sizing, print_run)
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
        "summaries": summaries(runs, SYSTEMS, args.clients),
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
