"""The variants benchmark: one server serving three variants side by side, against the fused
single-variant servers a deployment would otherwise run, one variant at a time.

    python -m bench variants            # a real run (several minutes on 2 cores)
    python -m bench variants --quick    # a smoke check

The three variants stand for Qwen-Image-Lightning 4-step, Lightning 8-step and the base model
with true CFG, on the bench model and its LoRA files (`ink`, `neon`: random LoRAs, so the
images mean nothing; the cost is what is measured):

- *variants*: one server with `--variants` (every variant's LoRA applied per row, unfused),
  under closed-loop clients, request i naming variant i mod 3 (a third of the load each);
- *fused-NAME*: for each variant, a server started as a single-variant deployment would be
  (`--lora FILE` fused into the weights, its `--scheduler-preset` and `--default-steps`), under
  the same number of clients sending only that variant.

The fused servers serve the mix "one variant at a time": an image of variant v costs the
machine 1 / ips_v seconds there, so the mix runs at 1 / sum(share_v / ips_v) images/s; the
report sets the variants server's images/s against that. The variants server also runs the
Lightning 8-step traffic alone: against fused-lightning-8 that is what unfused per-row LoRA
costs. Servers run side by side and take turns in rounds, in a rotating order (the machine's
speed drifts), as in the adapter benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from .cli import add_engine_arguments, add_quick_argument, resolution
from .launch import ServerProcess
from .loads import ClosedLoop, LoadGenerator
from .machine import describe_machine
from .output import add_output_arguments, fmt, results_header, run_and_report
from .servers import (
    DEFAULT_MODEL,
    ServerOptions,
    ensure_model,
    measure,
    real_server_command,
    rotated,
    start_server,
)
from .stats import closed_loop_stats, percentile, records_from_table, records_table
from .workloads import RequestClass

JSON_NAME = "variants.json"
MIXED = "mixed"  # the variants server's traffic: a third of each variant


@dataclass(frozen=True, slots=True)
class BenchVariant:
    name: str
    lora: str  # adapter file of the bench model ("" = none)
    preset: str  # scheduler preset
    steps: int
    guidance_scale: float


VARIANTS = (
    BenchVariant("lightning-4", "ink", "lightning", 4, 1.0),
    BenchVariant("lightning-8", "neon", "lightning", 8, 1.0),
    BenchVariant("base", "", "default", 16, 4.0),
)
ALONE = "lightning-8"  # the traffic the variants server also runs alone (per-row LoRA cost)


@dataclass(frozen=True, slots=True)
class Sizing:
    rounds: int  # turns of each server
    window_s: float  # each turn's clients send for this long after their first request


FULL = Sizing(rounds=2, window_s=20.0)
QUICK = Sizing(rounds=1, window_s=4.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_quick_argument(parser, "one short round")
    add_output_arguments(parser, "only redo the markdown from JSON")
    add_engine_arguments(parser, DEFAULT_MODEL, "model directory (with adapters/)")
    parser.add_argument("--resolution", type=resolution, default="256x256")
    parser.add_argument("--clients", type=int, default=12, help="closed-loop clients per run")
    parser.add_argument("--max-batch-size", type=int, default=8)


def run(args: argparse.Namespace) -> int:
    return run_and_report(
        args, JSON_NAME, "bench-variants", lambda: asyncio.run(run_bench(args)), summary_lines
    )


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    ensure_model(args.model)
    sizing = QUICK if args.quick else FULL
    args.steps = VARIANTS[0].steps  # the servers' warm-up and default request
    options = ServerOptions.from_args(args, 4 * args.clients, min(args.resolution))
    turns = [("variants", MIXED), ("variants", ALONE)] + [
        (f"fused-{variant.name}", variant.name) for variant in VARIANTS
    ]
    runs: list[dict[str, Any]] = []
    with ExitStack() as stack:
        servers: dict[str, ServerProcess] = {}
        for system in dict.fromkeys(system for system, _ in turns):  # one at a time: each loads
            command = real_server_command(options, "step", _flags(args, system))
            servers[system] = stack.enter_context(await start_server(system, _own(command)))
        generators = {name: LoadGenerator(s.target, run_name=name) for name, s in servers.items()}
        try:
            for system, traffic in turns:
                classes = [_class_of(args, system, traffic, i) for i in range(len(VARIANTS))]
                await generators[system].warm_up(classes)
            for round_number in range(sizing.rounds):
                for system, traffic in rotated(turns, round_number):
                    server, generator = servers[system], generators[system]
                    run = await _closed_run(server, generator, args, traffic, sizing)
                    runs.append({"system": system, "traffic": traffic, **run})
                    _print_run(round_number, runs[-1])
        finally:
            for generator in generators.values():
                await generator.close()
    return {
        **results_header(args, describe_machine(args.torch_threads, "auto")),
        "settings": {
            "resolution": "x".join(map(str, args.resolution)),
            "clients": args.clients,
            "variants": [_spec(variant) for variant in VARIANTS],
            "max_batch_size": args.max_batch_size,
            "rounds": sizing.rounds,
            "window_s": sizing.window_s,
        },
        "summaries": [_summarize(runs, system, traffic) for system, traffic in turns],
        "runs": runs,
        "wall_s": round(time.monotonic() - started, 1),
    }


def _spec(variant: BenchVariant) -> dict[str, Any]:
    return {
        "name": variant.name,
        "lora": variant.lora,
        "scheduler_preset": variant.preset,
        "steps": variant.steps,
        "guidance_scale": variant.guidance_scale,
    }


def _flags(args: argparse.Namespace, system: str) -> list[str]:
    """The variants server's `--variants`, or a fused single-variant deployment's flags."""
    adapters = args.model / "adapters"
    if system == "variants":
        entries = [
            {
                "name": variant.name,
                "loras": [str(adapters / f"{variant.lora}.safetensors")] if variant.lora else [],
                "scheduler_preset": variant.preset,
                "default_steps": variant.steps,
                "default_guidance_scale": variant.guidance_scale,
            }
            for variant in VARIANTS
        ]
        return ["--variants", json.dumps(entries)]
    variant = _variant(system.removeprefix("fused-"))
    flags = ["--scheduler-preset", variant.preset]
    if variant.lora:
        flags += ["--lora", json.dumps([str(adapters / f"{variant.lora}.safetensors")])]
    return flags


def _own(command: list[str]) -> list[str]:
    """A variants server takes its default steps from its default variant: `--default-steps`
    (which every bench server gets) is refused next to `--variants`, so it goes."""
    if "--variants" not in command or "--default-steps" not in command:
        return command
    at = command.index("--default-steps")
    return command[:at] + command[at + 2 :]


def _variant(name: str) -> BenchVariant:
    return next(variant for variant in VARIANTS if variant.name == name)


def _class_of(args: argparse.Namespace, system: str, traffic: str, client: int) -> RequestClass:
    """Client `client`'s requests: on the mixed traffic variant client mod 3, else `traffic`."""
    variant = VARIANTS[client % len(VARIANTS)] if traffic == MIXED else _variant(traffic)
    width, height = args.resolution
    named = variant.name if system == "variants" else ""  # a fused server has no variants
    return RequestClass(
        width, height, variant.steps, variant=named, guidance_scale=variant.guidance_scale
    )


async def _closed_run(
    server: ServerProcess,
    generator: LoadGenerator,
    args: argparse.Namespace,
    traffic: str,
    sizing: Sizing,
) -> dict[str, Any]:
    """One turn: `args.clients` clients for the window after their first requests."""

    async def drive(before: Any) -> Any:
        load = ClosedLoop(
            clients=args.clients,
            duration_s=sizing.window_s,
            min_samples=args.clients,
            max_duration_s=3 * sizing.window_s,
        )
        return await generator.closed_loop(
            load, lambda i: _class_of(args, server.name, traffic, i % args.clients)
        )

    measured = await measure(server, drive)
    stats = closed_loop_stats(measured.records, args.clients, 0.0, measured.end_s)
    return {
        "clients": args.clients,
        "stats": stats.to_dict(),
        "rows_per_step": measured.rows_per_step,
        "duration_s": round(measured.end_s, 2),
        "records": records_table(measured.records),
    }


def _summarize(runs: list[dict[str, Any]], system: str, traffic: str) -> dict[str, Any]:
    """Pools the rounds of one server and traffic: images/s is clients / mean latency (Little's
    law), and p95 is given per variant (told apart by their step counts, all different)."""
    mine = [run for run in runs if (run["system"], run["traffic"]) == (system, traffic)]
    records = [
        record
        for run in mine
        for record in records_from_table(run["records"])
        if record.ok and not record.first_of_client and record.latency_s is not None
    ]
    latencies = [record.latency_s for record in records if record.latency_s is not None]
    by_variant = {
        variant.name: sorted(
            record.latency_s
            for record in records
            if record.steps == variant.steps and record.latency_s is not None
        )
        for variant in VARIANTS
    }
    return {
        "system": system,
        "traffic": traffic,
        "throughput_ips": mine[0]["clients"] / statistics.fmean(latencies) if latencies else 0.0,
        "p95_s": {name: percentile(values, 95) for name, values in by_variant.items() if values},
        "rows_per_step": _mean([run["rows_per_step"] for run in mine]),
        "requests": len(latencies),
    }


def _mean(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.fmean(present) if present else None


def summary_lines(results: dict[str, Any]) -> list[str]:
    settings, machine = results["settings"], results["machine"]
    summaries = {(s["system"], s["traffic"]): s for s in results["summaries"]}
    fused = {v.name: summaries[(f"fused-{v.name}", v.name)]["throughput_ips"] for v in VARIANTS}
    one_at_a_time = one_variant_at_a_time(list(fused.values()))
    mixed = summaries[("variants", MIXED)]
    alone = summaries[("variants", ALONE)]
    lines = [
        f"Measured {machine['date']} with `{results['command']}` "
        f"({results['wall_s'] / 60:.1f} min{', quick mode' if results['quick'] else ''}); "
        f"{machine['cpu_model']}, {machine['logical_cores']} logical cores, torch "
        f"{machine['torch']}. Closed loops of {settings['clients']} clients at "
        f"{settings['resolution']}, {settings['rounds']} rounds of about "
        f"{settings['window_s']:.0f} s per server and traffic. Raw data: "
        f"[{JSON_NAME}](benchmarks/{JSON_NAME}).",
        "",
        "| server | traffic | images/s | rows/step | requests | "
        + " | ".join(f"p95 s {v.name}" for v in VARIANTS)
        + " |",
        "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in VARIANTS) + " |",
    ]
    for summary in results["summaries"]:
        lines.append(
            f"| {summary['system']} | {summary['traffic']} | {summary['throughput_ips']:.3f} "
            f"| {fmt(summary['rows_per_step'])} | {summary['requests']} | "
            + " | ".join(fmt(summary["p95_s"].get(v.name)) for v in VARIANTS)
            + " |"
        )
    lines += [
        "",
        f"The mix on one variants server: {mixed['throughput_ips']:.3f} images/s; on the fused "
        f"servers one variant at a time: {one_at_a_time:.3f} images/s "
        f"(ratio {mixed['throughput_ips'] / one_at_a_time:.2f}). Unfused per-row LoRA "
        f"({ALONE} traffic alone): {alone['throughput_ips']:.3f} images/s against "
        f"{fused[ALONE]:.3f} fused (ratio {alone['throughput_ips'] / fused[ALONE]:.2f}).",
    ]
    return lines


def one_variant_at_a_time(fused_ips: list[float]) -> float:
    """Images/s of an equal mix served by single-variant servers in turn: an image of variant v
    takes 1 / ips_v of the machine's time. NaN when a server delivered nothing."""
    if not fused_ips or not all(fused_ips):
        return float("nan")
    return 1 / sum((1 / len(fused_ips)) / ips for ips in fused_ips)


def _print_run(round_number: int, run: dict[str, Any]) -> None:
    stats = run["stats"]
    latency = stats["latency"]
    print(
        f"  round {round_number + 1} {run['system']:18} {run['traffic']:12}: "
        f"{stats['throughput_ips']:.3f} img/s, p50 {fmt(latency['p50'])} s, "
        f"p95 {fmt(latency['p95'])} s, n={latency['count']}, "
        f"rows/step {fmt(run['rows_per_step'])}",
        flush=True,
    )
