"""The batching benchmark (`make bench`): the engine's throughput limit against three servers
under the same loads.

    python -m bench batching            # the full CPU bench (about 13 minutes on 2 cores)
    python -m bench batching --quick    # a smoke check of every part (about 3 minutes)
    python -m bench batching --device cuda --resolution 1024x1024 --steps 8 --torch-threads 0
    python -m bench batching --report-only docs/benchmarks/results.json   # redo plot, markdown

It measures, in one run on one machine with the `bench` preset model: the engine alone (no
server) at batch sizes 1..8, a naive one-request-at-a-time diffusers server, and the real server
with request-level and step-level batching, under closed-loop and open-loop (Poisson) loads, for
one resolution and for a mix of resolutions and step counts. Results go to JSON and a PNG plot
in docs/benchmarks/, summarised in docs/benchmarks.md.

Order: the engine alone in this process (the limit), then the server subprocesses (naive,
request-level, step-level) under the closed and open loops of every workload: on a CPU all up
at once, taking turns at each load point; on a GPU, where each holds the whole model, one at a
time after this process has let go of the device.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import plan as plans
from .cli import add_engine_arguments, add_quick_argument, floats, ints, resolution, resolutions
from .cli import subset_of as subset
from .limit import EngineBench, measure_limit
from .machine import BUSY_CORES, describe_machine, wait_for_quiet
from .output import add_output_arguments, read_json, resolve_outputs, results_header, write_json
from .plot import plot_results
from .report import JSON_NAME, PLOT_NAME, print_targets, update_markdown
from .runner import QUIET_WAIT_S, Runner
from .servers import DEFAULT_MODEL, ServerOptions, describe_model, ensure_model
from .stats import recompute_stats
from .targets import evaluate
from .workloads import mix_workload, single_workload

SYSTEMS = ("naive", "request", "step", "step-all")
DEFAULT_SYSTEMS = ("naive", "request", "step")  # step-all: for row-selection comparisons
WORKLOADS = ("single", "mix")


@dataclass(frozen=True, slots=True)
class LimitSizing:
    min_batches: int  # measured batches per point, after one warm-up batch
    min_seconds: float  # and at least this long per point
    latency_samples: int  # batch-1 requests behind the engine-alone latency


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_quick_argument(parser, "fewer, shorter runs")
    add_output_arguments(parser, "only redo plot and markdown from JSON")
    add_engine_arguments(
        parser, DEFAULT_MODEL, "model directory; the bench preset is written there if missing"
    )
    parser.add_argument(
        "--resolution", type=resolution, default="256x256", help="single workload WIDTHxHEIGHT"
    )
    parser.add_argument("--steps", type=int, default=8, help="single workload steps")
    parser.add_argument(
        "--mix-resolutions",
        type=resolutions,
        default="256x256,192x192",
        help="mix: comma-separated",
    )
    parser.add_argument(
        "--mix-steps", type=ints, default="4,8", help="mix: comma-separated step counts"
    )
    parser.add_argument(
        "--batch-sizes", type=ints, help="engine sweep (default 1,2,4,8; quick 1,4)"
    )
    parser.add_argument("--max-batch-size", type=int, default=8, help="servers' --max-batch-size")
    parser.add_argument("--max-queue-size", type=int, default=256, help="servers' --max-queue-size")
    parser.add_argument(
        "--clients", type=ints, help="closed-loop clients (default 1,4,16,64; quick 1,4)"
    )
    parser.add_argument(
        "--naive-max-clients",
        type=int,
        default=16,
        help="skip closed loops above this for the naive server (serial: saturated from 2 "
        "clients on, so more only multiply its latency); 0 = none skipped",
    )
    parser.add_argument(
        "--loads",
        type=floats,
        help="open-loop fractions of the limit (default 0.5,0.8,1.0,1.2; quick 0.8)",
    )
    parser.add_argument(
        "--systems",
        type=subset(SYSTEMS),
        default=",".join(DEFAULT_SYSTEMS),
        help=f"subset of {','.join(SYSTEMS)} (step-all: step-level with --row-selection all)",
    )
    parser.add_argument(
        "--workloads",
        type=subset(WORKLOADS),
        default=",".join(WORKLOADS),
        help="subset of single,mix",
    )
    parser.add_argument("--seed", type=int, default=0, help="arrival times and mix classes")
    parser.add_argument(
        "--light-load-pairs",
        type=int,
        help="engine-alone / server request pairs for the light-load target (default 8; quick 3)",
    )


def run(args: argparse.Namespace) -> int:
    _fill_defaults(args)
    if args.report_only:
        results = read_json(args.report_only)
        for entry in results["runs"]:  # every figure again, from the stored requests
            if "records" in entry:
                entry["stats"] = recompute_stats(entry).to_dict()
        results["targets"] = [target.to_dict() for target in evaluate(results)]
        write_json(results, args.report_only)  # with the targets as this code judges them
        _write_report(results, args.report_only.parent, args.markdown)
        return 0
    results = run_bench(args)
    write_json(results, args.out / JSON_NAME)
    _write_report(results, args.out, args.markdown)
    print(f"results: {args.out}/ and {args.markdown} ({results['wall_s'] / 60:.1f} min)")
    return 0


def _fill_defaults(args: argparse.Namespace) -> None:
    """The defaults that depend on --quick."""
    args.batch_sizes = args.batch_sizes or ([1, 4] if args.quick else [1, 2, 4, 8])
    args.clients = args.clients or ([1, 4] if args.quick else [1, 4, 16, 64])
    args.light_load_pairs = args.light_load_pairs or (3 if args.quick else 8)
    args.loads = args.loads or ([0.8] if args.quick else [0.5, 0.8, 1.0, 1.2])
    resolve_outputs(args)


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    sizing = plans.QUICK if args.quick else plans.FULL
    single = single_workload(args.resolution, args.steps)
    mix = mix_workload(args.mix_resolutions, args.mix_steps)
    workloads = [w for w in (single, mix) if w.name in args.workloads]
    ensure_model(args.model)
    _wait_for_quiet_machine()

    print("engine alone (the limit):", flush=True)
    sizes = {(c.width, c.height) for workload in workloads for c in workload.classes}
    bench = EngineBench(
        args.model, args.device, args.dtype, args.torch_threads, decode_sizes=sorted(sizes)
    )
    device = bench.device
    machine = describe_machine(args.torch_threads, device)
    limit = measure_limit(
        bench,
        single.classes[0],
        args.batch_sizes,
        list(mix.classes) if mix in workloads else [],
        **dataclasses.asdict(_limit_sizing(args.quick)),
        progress=lambda line: print(line, flush=True),
    )
    print(
        f"after {time.monotonic() - started:.0f} s: "
        f"limit {limit.limit_ips:.3f} img/s at batch {limit.best_batch_size}; engine-alone "
        f"latency {limit.latency_s * 1000:.0f} ms"
        + (f"; mix limit {limit.mix_limit_ips:.3f} img/s" if limit.mix_limit_ips else ""),
        flush=True,
    )
    min_size = min(min(size) for size in [args.resolution, *args.mix_resolutions])
    options = ServerOptions.from_args(args, args.max_queue_size, min_size)
    # The engine stays loaded: the runner times it again next to the runs the targets read.
    runner = Runner(args, sizing, limit, options, workloads, bench, started)
    factor = runner.fit_to_budget()
    print(
        f"servers: about {(runner.estimate_s() + runner.overhead_s()) / 60:.1f} min"
        + (f" (runs shortened to {factor:.0%} to fit the time budget)" if factor < 1 else ""),
        flush=True,
    )
    runs = asyncio.run(runner.run_all())
    results: dict[str, Any] = {
        **results_header(args, machine),
        "settings": {
            "model": describe_model(args.model),
            "single": single.describe(),
            "mix": mix.describe(),
            "mix_steps": list(mix.step_counts),
            "batch_sizes": list(args.batch_sizes),
            "max_batch_size": args.max_batch_size,
            "max_queue_size": args.max_queue_size,
            "torch_threads": args.torch_threads,
            "clients": list(args.clients),
            "naive_max_clients": args.naive_max_clients,
            "loads": list(args.loads),
            "systems": list(args.systems),
            "workloads": list(args.workloads),
            "seed": args.seed,
            "sizing": dataclasses.asdict(runner.sizing),
            "sizing_factor": factor,
        },
        "limit": limit.to_dict(),
        "light_load_pairs": runner.light_load,
        "runs": runs,
    }
    results["wall_s"] = round(time.monotonic() - started, 1)
    results["targets"] = [target.to_dict() for target in evaluate(results)]
    return results


def _limit_sizing(quick: bool) -> LimitSizing:
    if quick:
        return LimitSizing(min_batches=1, min_seconds=0.0, latency_samples=3)
    return LimitSizing(min_batches=2, min_seconds=3.0, latency_samples=6)


def _wait_for_quiet_machine() -> None:
    """Gives other processes up to QUIET_WAIT_S to leave the CPU before measuring starts."""
    background = wait_for_quiet(
        [os.getpid()],
        BUSY_CORES,
        QUIET_WAIT_S,
        on_busy=lambda cores: print(
            f"other processes use {cores:.2f} cores: waiting for them", flush=True
        ),
    )
    if background > BUSY_CORES:
        print(f"warning: other processes use {background:.2f} cores; numbers will suffer")


def _write_report(results: dict[str, Any], out_dir: Path, markdown: Path) -> None:
    plot_results(results, out_dir / PLOT_NAME)
    update_markdown(results, markdown, out_dir)
    print_targets(results["targets"])
