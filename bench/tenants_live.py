"""Tenants on a real server: fair share against first come first served, measured.

    python -m bench tenants-live            # `make bench-tenants` (about 5 minutes on 2 cores)
    python -m bench tenants-live --quick    # a smoke check

`python -m bench tenants` answers the question in seconds on a model of the engine; this asks
the server. One step-level server of the `bench` model runs at a time, with a tokens file naming
three tokens, under closed loops heavier than the engine: the clients of tokens A and B from the
start, those of C from halfway. The same load runs twice: once with the three tokens in one
tenant (one weight: each priority level's queue is first come first served, as before fair
share), once with tenants A (weight 1), B (weight 3) and C (weight 1). The report gives each
tenant's share of the images finished in each window, its p95 latency (each client's first
request left out) and how long C's first requests took.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .cli import add_engine_arguments, add_quick_argument, resolution
from .launch import HOST, ServerProcess
from .loads import ClosedLoop, LoadGenerator
from .machine import describe_machine
from .output import add_output_arguments, fmt, results_header, run_and_report
from .servers import DEFAULT_MODEL, ServerOptions, ensure_model, real_server_command, start_server
from .stats import RequestRecord, percentile, records_from_table, records_table
from .workloads import RequestClass

JSON_NAME = "tenants-live.json"
TENANTS = ("A", "B", "C")  # C arrives halfway
WEIGHTS = {"A": 1, "B": 3, "C": 1}
SCHEDULERS = {"fcfs": "first come first served", "fair": "fair share"}
TOKENS = {tenant: f"bench-tenant-{tenant.lower()}-0123456789" for tenant in TENANTS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_quick_argument(parser, "40 s per scheduler instead of 120")
    add_output_arguments(parser, "only redo the markdown from JSON")
    add_engine_arguments(parser, DEFAULT_MODEL, "model directory; the bench preset if missing")
    parser.add_argument("--resolution", type=resolution, default="256x256", help="every request")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--clients", type=int, default=6, help="closed loops per tenant")
    parser.add_argument("--seconds", type=float, help="each run (default 120; quick 40)")
    parser.add_argument("--window", type=float, help="seconds per share window (20; quick 10)")
    parser.add_argument("--max-batch-size", type=int, default=4)


def run(args: argparse.Namespace) -> int:
    args.seconds = args.seconds or (40.0 if args.quick else 120.0)
    args.window = args.window or (10.0 if args.quick else 20.0)
    return run_and_report(
        args, JSON_NAME, "bench-tenants", lambda: asyncio.run(run_bench(args)), summary_lines
    )


def tokens_file(directory: Path, fair: bool) -> Path:
    """The tokens file of one run: three tenants with their weights, or one for all."""
    tenants = {tenant: {"weight": WEIGHTS[tenant]} for tenant in TENANTS}
    tokens = [
        {"name": tenant, "token": TOKENS[tenant], "role": "client", "tenant": tenant}
        for tenant in TENANTS
    ]
    if not fair:
        tenants = {"shared": {"weight": 1}}
        tokens = [{**token, "tenant": "shared"} for token in tokens]
    path = directory / f"tokens-{'fair' if fair else 'fcfs'}.yaml"
    path.write_text(yaml.safe_dump({"tenants": tenants, "tokens": tokens}), encoding="utf-8")
    return path


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    ensure_model(args.model)
    width, height = args.resolution
    request_class = RequestClass(width, height, args.steps)
    queue = 4 * len(TENANTS) * args.clients  # nobody is refused: the queue orders, not drops
    options = ServerOptions.from_args(args, queue, min(width, height))
    runs = {}
    with tempfile.TemporaryDirectory() as directory:
        for scheduler, name in SCHEDULERS.items():
            tokens = tokens_file(Path(directory), fair=scheduler == "fair")
            command = real_server_command(options, "step", ["--auth-tokens-file", str(tokens)])
            server = await start_server(scheduler, command)
            try:
                runs[scheduler] = await _contend(server, request_class, args)
            finally:
                server.stop()
            print(f"  {name}: {_served(runs[scheduler])}", flush=True)
    return {
        **results_header(args, describe_machine(args.torch_threads, args.device)),
        "settings": {
            "request": request_class.label,
            "clients_per_tenant": args.clients,
            "seconds": args.seconds,
            "window_s": args.window,
            "late_s": args.seconds / 2,
            "max_batch_size": args.max_batch_size,
            "weights": WEIGHTS,
        },
        "runs": runs,
        "wall_s": round(time.monotonic() - started, 1),
    }


async def _contend(
    server: ServerProcess, request_class: RequestClass, args: argparse.Namespace
) -> dict[str, Any]:
    """Every tenant's closed loops on `server`; C's start halfway. Per tenant, its records with
    times from the run's start."""
    origin = time.perf_counter()

    async def tenant_loops(tenant: str, delay_s: float) -> list[RequestRecord]:
        await asyncio.sleep(delay_s)
        target = f"{HOST}:{server.port}"
        generator = LoadGenerator(target, f"tenant {tenant}", token=TOKENS[tenant])
        offset = time.perf_counter() - origin
        try:
            load = ClosedLoop(args.clients, args.seconds - delay_s)
            records, _ = await generator.closed_loop(load, lambda _index: request_class)
        finally:
            await generator.close()
        for record in records:  # from the run's start, not this tenant's
            record.issued_s += offset
            if record.finished_s is not None:
                record.finished_s += offset
        return records

    delays = {tenant: args.seconds / 2 if tenant == "C" else 0.0 for tenant in TENANTS}
    loops = await asyncio.gather(*(tenant_loops(tenant, delays[tenant]) for tenant in TENANTS))
    return {tenant: records_table(records) for tenant, records in zip(TENANTS, loops, strict=True)}


def window_shares(
    records: Mapping[str, Sequence[RequestRecord]], window_s: float, seconds: float
) -> list[Counter[str]]:
    """Images each tenant finished in each window of `window_s` (one image per request)."""
    windows: list[Counter[str]] = [Counter() for _ in range(int(seconds // window_s))]
    for tenant, tenant_records in records.items():
        for record in tenant_records:
            if record.ok and record.finished_s is not None:
                index = int(record.finished_s // window_s)
                if index < len(windows):
                    windows[index][tenant] += 1
    return windows


def p95_s(records: Sequence[RequestRecord]) -> float | None:
    """p95 latency of the steady state: finished requests, each client's first left out."""
    latencies = [r.latency_s for r in records if r.ok and not r.first_of_client]
    return percentile([latency for latency in latencies if latency is not None], 95)


def first_waits_s(records: Sequence[RequestRecord]) -> list[float]:
    """Latencies of each client's first request (for C: from arriving to its first image)."""
    return sorted(
        r.latency_s for r in records if r.ok and r.first_of_client and r.latency_s is not None
    )


def _served(run: dict[str, Any]) -> str:
    counts = {tenant: sum(r.ok for r in records_from_table(run[tenant])) for tenant in TENANTS}
    return ", ".join(f"{tenant} {count} images" for tenant, count in counts.items())


def summary_lines(results: dict[str, Any]) -> list[str]:
    settings = results["settings"]
    machine = results["machine"]
    lines = [
        f"Measured {machine['date']} with `{results['command']}` ({results['wall_s'] / 60:.1f}"
        f" min{', quick mode' if results['quick'] else ''}); {machine['cpu_model']},"
        f" {machine['logical_cores']} logical cores, torch {machine['torch']}."
        f" {settings['clients_per_tenant']} closed-loop clients per tenant, {settings['request']}"
        f" per request, `--max-batch-size {settings['max_batch_size']}`; C from"
        f" {settings['late_s']:g} s. Raw data: [{JSON_NAME}](benchmarks/{JSON_NAME}).",
        "",
        "| scheduler | window | A (w1) | B (w3) | C (w1, late) | images | p95 A / B / C (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for scheduler, name in SCHEDULERS.items():
        records = {t: records_from_table(results["runs"][scheduler][t]) for t in TENANTS}
        p95 = " / ".join(fmt(p95_s(records[tenant]), ".1f") for tenant in TENANTS)
        window_s = settings["window_s"]
        for index, window in enumerate(window_shares(records, window_s, settings["seconds"])):
            total = sum(window.values())
            cells = " | ".join(f"{window[t] / max(total, 1):.0%}" for t in TENANTS)
            span = f"{index * window_s:g}-{(index + 1) * window_s:g} s"
            lines.append(f"| {name} | {span} | {cells} | {total} | {p95 if index == 0 else ''} |")
        waits = first_waits_s(records["C"])
        first, median = min(waits, default=None), percentile(waits, 50)
        took = f"{fmt(first, '.1f')} s (its clients' first: median {fmt(median, '.1f')} s)"
        lines.append(f"| {name} | C's first image took | | | {took} | | |")
    return lines
