"""`make bench`: measure the limit, then every system under every load, then write the report.

    python -m bench.run                 # the full CPU bench (about 13 minutes on 2 cores)
    python -m bench.run --quick         # a smoke check of every part (about 3 minutes)
    python -m bench.run --device cuda --resolution 1024x1024 --steps 8 --torch-threads 0
    python -m bench.run --report-only docs/benchmarks/results.json   # redo plot and markdown

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
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from . import plan as plans
from .limit import EngineBench, measure_limit
from .machine import BUSY_CORES, CpuMeter, describe_machine
from .plot import plot_results
from .report import (
    JSON_NAME,
    PLOT_NAME,
    add_output_arguments,
    print_targets,
    read_json,
    resolve_outputs,
    update_markdown,
    write_json,
)
from .runner import QUIET_WAIT_S, Runner
from .servers import DEFAULT_MODEL, ServerOptions, describe_model, ensure_model
from .stats import recompute_stats
from .targets import evaluate
from .workloads import mix_workload, parse_ints, resolution_arg, resolutions_arg, single_workload

SYSTEMS = ("naive", "request", "step", "step-all")
DEFAULT_SYSTEMS = ("naive", "request", "step")  # step-all: for row-selection comparisons
WORKLOADS = ("single", "mix")


@dataclass(frozen=True, slots=True)
class LimitSizing:
    min_batches: int  # measured batches per point, after one warm-up batch
    min_seconds: float  # and at least this long per point
    latency_samples: int  # batch-1 requests behind the engine-alone latency


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="fewer, shorter runs (smoke check)")
    add_output_arguments(parser)
    parser.add_argument(
        "--model",
        type=Path,
        default=DEFAULT_MODEL,
        help="model directory; the bench preset is written there if missing",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    parser.add_argument(
        "--torch-threads", type=int, default=2, help="torch CPU threads; 0 = default"
    )
    parser.add_argument(
        "--resolution", type=resolution_arg, default="256x256", help="single workload WIDTHxHEIGHT"
    )
    parser.add_argument("--steps", type=int, default=8, help="single workload steps")
    parser.add_argument(
        "--mix-resolutions",
        type=resolutions_arg,
        default="256x256,192x192",
        help="mix: comma-separated",
    )
    parser.add_argument("--mix-steps", default="4,8", help="mix: comma-separated step counts")
    parser.add_argument("--batch-sizes", help="engine sweep (default 1,2,4,8; quick 1,4)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="servers' --max-batch-size")
    parser.add_argument("--max-queue-size", type=int, default=256, help="servers' --max-queue-size")
    parser.add_argument("--clients", help="closed-loop clients (default 1,4,16,64; quick 1,4)")
    parser.add_argument(
        "--naive-max-clients",
        type=int,
        default=16,
        help="skip closed loops above this for the naive server (serial: saturated from 2 "
        "clients on, so more only multiply its latency); 0 = none skipped",
    )
    parser.add_argument(
        "--loads", help="open-loop fractions of the limit (default 0.5,0.8,1.0,1.2; quick 0.8)"
    )
    parser.add_argument(
        "--systems",
        default=",".join(DEFAULT_SYSTEMS),
        help=f"subset of {','.join(SYSTEMS)} (step-all: step-level with --row-selection all)",
    )
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="subset of single,mix")
    parser.add_argument("--seed", type=int, default=0, help="arrival times and mix classes")
    parser.add_argument(
        "--light-load-pairs",
        type=int,
        help="engine-alone / server request pairs for the light-load target (default 8; quick 3)",
    )
    parser.add_argument(
        "--report-only", type=Path, metavar="JSON", help="only redo plot and markdown from JSON"
    )
    args = parser.parse_args(argv)
    args.batch_sizes = parse_ints(args.batch_sizes or ("1,4" if args.quick else "1,2,4,8"))
    args.clients = parse_ints(args.clients or ("1,4" if args.quick else "1,4,16,64"))
    args.light_load_pairs = args.light_load_pairs or (3 if args.quick else 8)
    args.loads = _floats(args.loads or ("0.8" if args.quick else "0.5,0.8,1.0,1.2"))
    args.mix_steps = parse_ints(args.mix_steps)
    args.systems = _choices(args.systems, SYSTEMS, parser)
    args.workloads = _choices(args.workloads, WORKLOADS, parser)
    resolve_outputs(args)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.report_only:
        results = read_json(args.report_only)
        for run in results["runs"]:  # every figure again, from the stored requests
            if "records" in run:
                run["stats"] = recompute_stats(run).to_dict()
        results["targets"] = [target.to_dict() for target in evaluate(results)]
        write_json(results, args.report_only)  # with the targets as this code judges them
        _write_report(results, args.report_only.parent, args.markdown)
        return 0
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so `finally` blocks stop the servers
    command = f"python -m bench.run {' '.join(argv)}" if argv else "make bench"
    results = run_bench(args, command)
    write_json(results, args.out / JSON_NAME)
    _write_report(results, args.out, args.markdown)
    print(f"results: {args.out}/ and {args.markdown} ({results['wall_s'] / 60:.1f} min)")
    return 0


def run_bench(args: argparse.Namespace, command: str) -> dict[str, Any]:
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
    options = ServerOptions(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        torch_threads=args.torch_threads,
        max_batch_size=args.max_batch_size,
        max_queue_size=args.max_queue_size,
        default_width=args.resolution[0],
        default_height=args.resolution[1],
        default_steps=args.steps,
        min_size=min(min(size) for size in [args.resolution, *args.mix_resolutions]),
    )
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
        "schema": 1,
        "command": command,
        "quick": args.quick,
        "machine": machine,
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
    deadline = time.monotonic() + QUIET_WAIT_S
    while True:
        meter = CpuMeter([os.getpid()])
        meter.start()
        time.sleep(1.0)
        background = meter.stop().background
        if background <= BUSY_CORES:
            return
        if time.monotonic() > deadline:
            print(f"warning: other processes use {background:.2f} cores; numbers will suffer")
            return
        print(f"other processes use {background:.2f} cores: waiting for them", flush=True)


def _write_report(results: dict[str, Any], out_dir: Path, markdown: Path) -> None:
    plot_results(results, out_dir / PLOT_NAME)
    update_markdown(results, markdown, out_dir)
    print_targets([_target_from_dict(t) for t in results["targets"]])


def _target_from_dict(data: dict[str, Any]) -> Any:
    from .targets import TargetResult

    fields = {f.name for f in dataclasses.fields(TargetResult)}
    return TargetResult(**{k: v for k, v in data.items() if k in fields})


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def _choices(text: str, allowed: tuple[str, ...], parser: argparse.ArgumentParser) -> list[str]:
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [part for part in chosen if part not in allowed]
    if unknown:
        parser.error(f"unknown {unknown}; choose from {', '.join(allowed)}")
    return [name for name in allowed if name in chosen]


if __name__ == "__main__":
    raise SystemExit(main())
