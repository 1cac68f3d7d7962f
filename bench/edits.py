"""The edit benchmark: Qwen-Image-Edit-Plus requests with two reference images each, served
with step-level batching against request-level batching, and the engine alone as the limit.

    python -m bench edits            # `make bench-edits`
    python -m bench edits --quick    # a smoke check

The model is the `bench` preset of the random-weight model written as an Edit-Plus checkpoint
(`tiny-model --preset bench --pipeline edit-plus`). Every request edits the same two pictures
(640x480 and 480x480), each VAE-encoded at about one megapixel as the pipeline does: 4,096
reference tokens each next to the target's, so a row costs several times a text-to-image row of
its size. The two servers run side by side (an idle one uses no CPU) and take turns in rounds,
in a rotating order; throughput is clients / mean latency, each client's first request of a
round not counted (as `adapters`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any

from .cli import add_engine_arguments, add_quick_argument, ints, resolution
from .limit import EngineBench
from .machine import describe_machine
from .output import add_output_arguments, fmt, results_header, run_and_report
from .rounds import FULL, QUICK, Sizing, closed_rounds, print_run, summaries
from .servers import ServerOptions, ensure_model, real_server_command
from .workloads import RequestClass

SYSTEMS = ("step", "request")  # the servers' --batching
DEFAULT_EDIT_MODEL = Path(".cache/bench-edit-plus-model")
JSON_NAME = "edits.json"
LIMIT_MIN_BATCHES = 2  # per batch size, after one warm-up batch
LIMIT_MIN_SECONDS = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_quick_argument(parser, "one short round, fewer batch sizes and clients")
    add_output_arguments(parser, "only redo the markdown from JSON")
    add_engine_arguments(
        parser, DEFAULT_EDIT_MODEL, "Edit-Plus model directory; written if missing"
    )
    parser.add_argument("--resolution", type=resolution, default="256x256", help="the output")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--references", type=int, default=2, help="reference images, 1 to 3")
    parser.add_argument("--clients", type=ints, help="closed loops (default 1,4,8; quick 4)")
    parser.add_argument("--batch-sizes", type=ints, help="the limit's (default 1,2,4; quick 1,4)")
    parser.add_argument("--max-batch-size", type=int, default=8)


def run(args: argparse.Namespace) -> int:
    args.clients = args.clients or ([4] if args.quick else [1, 4, 8])
    args.batch_sizes = args.batch_sizes or ([1, 4] if args.quick else [1, 2, 4])
    return run_and_report(
        args, JSON_NAME, "bench-edits", lambda: asyncio.run(run_bench(args)), summary_lines
    )


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    ensure_model(args.model, pipeline_kind="edit-plus")
    sizing = QUICK if args.quick else FULL
    width, height = args.resolution
    request_class = RequestClass(width, height, args.steps, references=args.references)
    limit = _engine_limit(args, request_class)
    options = ServerOptions.from_args(args, 4 * max(args.clients), min(width, height))
    commands = {system: real_server_command(options, system) for system in SYSTEMS}
    runs = await closed_rounds(
        commands,
        lambda _system, _index: request_class,
        1,
        args.clients,
        args.steps,
        sizing,
        print_run,
    )
    return _results(args, request_class, sizing, limit, runs, started)


def _engine_limit(args: argparse.Namespace, request_class: RequestClass) -> list[dict[str, Any]]:
    """The engine alone (no server, no gRPC) at each batch size: the most a server can do."""
    bench = EngineBench(args.model, args.device, args.dtype, args.torch_threads)
    try:
        points = []
        for batch_size in args.batch_sizes:
            point = bench.measure(request_class, batch_size, LIMIT_MIN_BATCHES, LIMIT_MIN_SECONDS)
            print(f"  engine alone, batch {batch_size}: {point.images_per_s:.3f} img/s", flush=True)
            points.append(dataclasses.asdict(point))
        return points
    finally:
        bench.release()  # the servers need the device (and, on a CPU, the cores) to themselves


def _results(
    args: argparse.Namespace,
    request_class: RequestClass,
    sizing: Sizing,
    limit: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    started: float,
) -> dict[str, Any]:
    machine = describe_machine(args.torch_threads, args.device)
    return {
        **results_header(args, machine),
        "settings": {
            "request": request_class.label,
            "references": args.references,
            "clients": args.clients,
            "batch_sizes": args.batch_sizes,
            "max_batch_size": args.max_batch_size,
            "rounds": sizing.rounds,
            "window_s": sizing.window_s,
        },
        "limit": limit,
        "summaries": summaries(runs, SYSTEMS, args.clients),
        "runs": runs,
        "wall_s": round(time.monotonic() - started, 1),
    }


def summary_lines(results: dict[str, Any]) -> list[str]:
    settings, machine = results["settings"], results["machine"]
    best = max(point["images_per_s"] for point in results["limit"])
    by_system = {(s["system"], s["clients"]): s for s in results["summaries"]}
    lines = [
        f"Measured {machine['date']} with `{results['command']}` "
        f"({results['wall_s'] / 60:.1f} min{', quick mode' if results['quick'] else ''}); "
        f"{machine['cpu_model']}, {machine['logical_cores']} logical cores, torch "
        f"{machine['torch']}. Edit-Plus requests {settings['request']} (two reference images "
        f"at about one megapixel each), closed loops, `--max-batch-size "
        f"{settings['max_batch_size']}`. Raw data: [{JSON_NAME}](benchmarks/{JSON_NAME}).",
        "",
        "Engine alone: " + ", ".join(_limit_point(point) for point in results["limit"]) + ".",
        "",
        "| batching | clients | images/s | of the limit | x request-level | p50 s | p95 s "
        "| rows/step | requests | failed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for data in results["summaries"]:
        request_level = by_system[("request", data["clients"])]["throughput_ips"] or float("nan")
        lines.append(
            f"| {data['system']}-level | {data['clients']} | {data['throughput_ips']:.3f} "
            f"| {data['throughput_ips'] / best:.0%} | {data['throughput_ips'] / request_level:.2f} "
            f"| {fmt(data['p50_s'])} | {fmt(data['p95_s'])} | {fmt(data['rows_per_step'])} "
            f"| {data['requests']} | {data['failed']} |"
        )
    return lines


def _limit_point(point: dict[str, Any]) -> str:
    return (
        f"batch {point['batch_size']} {point['images_per_s']:.3f} img/s"
        f" ({point['ms_per_step']:.0f} ms/step)"
    )
