"""The steps of `scripts/gpu-check.sh`: one prepared run that proves the GPU path.

    python -m bench gpu-check info   --out DIR                 # device, driver, library versions
    python -m bench gpu-check server --out DIR --name cold     # start-up phases of the real server
    python -m bench gpu-check engine --out DIR                 # the engine alone (`bench mfu`)
    python -m bench gpu-check server --out DIR --name serve --clients 1,4,16 --seconds 30
    python -m bench gpu-check report --out DIR [--docs]        # JSON + markdown (bench/gpu_report)
    python -m bench gpu-check docs                             # docs/gpu.md from the committed JSON

The shell script runs each step in its own process under its own `timeout`, so a step that hangs
or crashes costs only its budget and the next step still runs. Each step writes its JSON into
DIR as soon as it has something (a step cut off keeps what it measured); `report` merges them
with the script's step log into `gpu-check.json` and `summary.md`.

`server` starts the real `imagegen-server serve` as deployments run it (the default compile
setting and memory probe, bf16 on CUDA), reads the start-up phases from its metrics (load,
memory probe, compile, warm-up), and with `--clients` drives it with closed-loop clients, one
bounded run per client count, reading rows per step from its batch-size histogram. `engine`
runs `python -m bench mfu` on the same model: batch 1, 2, 4, and 8 where the start-up memory
probe said 8 rows fit.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from .cli import add_engine_arguments, ints, resolution
from .launch import HOST, ServerProcess, serve_command
from .output import read_json, write_json
from .servers import REPO_ROOT, measure
from .stats import closed_loop_stats
from .workloads import RequestClass

STEPS = ("info", "server", "engine", "report", "docs")
DEFAULT_OUT = Path("bench/results/gpu-check")  # git-ignored; `make gpu-check` writes here
ENGINE_BATCHES = (1, 2, 4)  # always measured; 8 too where the probe allows it
PROBED_BATCH = 8
SERVING_TIMEOUT_S = 480.0  # the step's own `timeout` is the real bound
LOG_LINES_KEPT = 400
QUEUE_SIZE = 64  # above the most clients any run uses: none is refused


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("step", choices=STEPS, help="which step of scripts/gpu-check.sh")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the run's folder")
    add_engine_arguments(parser, None, "model directory (written by the script)", 0)
    parser.add_argument("--name", default="serve", help="server: names its JSON files")
    parser.add_argument(
        "--resolution", type=resolution, default=(1024, 1024), help="default request size"
    )
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per request")
    parser.add_argument("--min-size", type=int, default=256, help="server: smallest width/height")
    parser.add_argument("--max-size", type=int, default=1328, help="server: largest width/height")
    parser.add_argument(
        "--clients", type=ints, default=[], help="server: closed-loop client counts, e.g. 1,4,16"
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="server: each load's length")
    parser.add_argument(
        "--batch-sizes", type=ints, help="engine: batch sizes (default 1,2,4 and 8 if it fits)"
    )
    parser.add_argument(
        "--server-flag",
        action="append",
        default=[],
        help="server: one more `serve` flag (repeat; e.g. --server-flag=--scheduler-preset ...)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="engine: measure a point again while other processes load the CPU (dry run: 0)",
    )
    parser.add_argument(
        "--peak-sizes", help="engine: `bench mfu --peak-sizes` (default: the device's own)"
    )
    parser.add_argument("--docs", action="store_true", help="report: refresh docs/gpu.md too")


def run(args: argparse.Namespace) -> int:
    # `timeout` stops a step with SIGTERM: exit through the `finally`s, which stop the server.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    if args.step != "docs":
        args.out.mkdir(parents=True, exist_ok=True)
    if args.step == "info":
        return write_info(args)
    if args.step == "server":
        return asyncio.run(run_server(args))
    if args.step == "engine":
        return run_engine(args)
    from .gpu_report import write_docs, write_report

    if args.step == "docs":
        return write_docs()
    return write_report(args.out, args.docs)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def write_info(args: argparse.Namespace) -> int:
    """Device, driver and library versions: printed, and `info.json`."""
    import diffusers
    import torch
    import transformers

    from .machine import describe_machine

    info = describe_machine(0, args.device)
    info["transformers"] = transformers.__version__
    info["diffusers"] = diffusers.__version__
    info["peft"] = _version_of("peft")
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info["gpu_memory_gib"] = round(properties.total_memory / 2**30, 1)
        info["driver"] = _nvidia_driver()
    write_json(info, args.out / "info.json")
    for key in ("gpu", "driver", "cuda", "gpu_memory_gib", "torch", "diffusers", "transformers"):
        print(f"{key}: {info.get(key, '-')}", flush=True)
    print(f"peft: {info['peft']}, python {info['python']}, {info['cpu_model']}", flush=True)
    return 0


def _version_of(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _nvidia_driver() -> str | None:
    """The driver version as nvidia-smi reports it (None without nvidia-smi)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    query = [smi, "--query-gpu=driver_version", "--format=csv,noheader"]
    done = subprocess.run(query, capture_output=True, text=True, timeout=30, check=False)
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout else None


def server_flags(args: argparse.Namespace) -> list[str]:
    """`serve` as deployments run it (default compile setting, memory probe on), sized for the
    check, on loopback."""
    width, height = args.resolution
    sizes = {
        "--min-width": args.min_size,
        "--min-height": args.min_size,
        "--max-width": args.max_size,
        "--max-height": args.max_size,
        "--default-width": width,
        "--default-height": height,
        "--default-steps": args.steps,
        "--max-queue-size": QUEUE_SIZE,
        "--drain-timeout-s": 5,
        "--torch-threads": args.torch_threads,
    }
    flags = ["--host", HOST, "--device", args.device, "--dtype", args.dtype]
    for flag, value in sizes.items():
        flags += [flag, str(value)]
    return flags + list(args.server_flag)


async def run_server(args: argparse.Namespace) -> int:
    """Starts the server, records its start-up, then runs each client count against it."""
    command = serve_command(args.model, *server_flags(args))
    started = time.monotonic()
    server = ServerProcess.start(
        command,
        name=args.name,
        cwd=REPO_ROOT,
        log_lines=LOG_LINES_KEPT,
        timeout_s=SERVING_TIMEOUT_S,
    )
    log_path = args.out / f"server-{args.name}.log"
    try:
        await asyncio.to_thread(server.wait_serving, SERVING_TIMEOUT_S)
        startup = startup_phases(server, time.monotonic() - started)
        startup["command"] = " ".join(command)
        write_json(startup, args.out / f"startup-{args.name}.json")
        print(_startup_line(args.name, startup), flush=True)
        await _run_loads(server, args)
    finally:
        server.stop()
        log_path.write_text("".join(server.log), encoding="utf-8")
    return 0


def startup_phases(server: ServerProcess, total_s: float) -> dict[str, Any]:
    """The start-up phases, in the order they run, from the server's own gauges."""
    metrics = server.metrics()
    caps = {
        sample.labels["resolution"]: int(sample.value)
        for sample in metrics.samples
        if sample.name == "imagegen_max_batch_size"
    }
    phases = {
        "load": metrics.value("imagegen_load_seconds"),
        "probe": metrics.value("imagegen_memory_probe_seconds"),
        "compile": metrics.value("imagegen_compile_seconds"),
        "warmup": metrics.value("imagegen_warmup_seconds"),
    }
    return {
        "phases_s": {name: round(value, 3) for name, value in phases.items()},
        "total_s": round(total_s, 2),  # process start to SERVING
        "max_batch_size": caps,  # by resolution; empty without the probe (off CUDA)
    }


def _startup_line(name: str, startup: dict[str, Any]) -> str:
    phases = ", ".join(f"{phase} {value:.1f} s" for phase, value in startup["phases_s"].items())
    return f"server {name}: SERVING after {startup['total_s']:.1f} s ({phases})"


async def _run_loads(server: ServerProcess, args: argparse.Namespace) -> None:
    """One closed-loop run per client count; `server-NAME.json` grows after each."""
    from .loads import ClosedLoop, LoadGenerator

    width, height = args.resolution
    request_class = RequestClass(width, height, args.steps)
    runs: list[dict[str, Any]] = []
    for clients in args.clients:
        generator = LoadGenerator(server.target, f"{args.name}-{clients}")
        # Until every client has a steady-state sample, up to twice the run's length.
        load = ClosedLoop(clients, args.seconds, clients, max_duration_s=2 * args.seconds)

        async def drive(_before: Any, load: ClosedLoop = load, generator: Any = generator) -> Any:
            return await generator.closed_loop(load, lambda _index: request_class)

        try:
            measured = await measure(server, drive)
        finally:
            await generator.close()
        stats = closed_loop_stats(measured.records, clients, 0.0, measured.end_s)
        run = {
            "clients": clients,
            "resolution": f"{width}x{height}",
            "steps": args.steps,
            "seconds": round(measured.end_s, 2),
            "images_per_s": stats.throughput_ips,
            "window_images_per_s": stats.window_throughput_ips,
            "p50_s": stats.latency.p50,
            "p95_s": stats.latency.p95,
            "samples": stats.latency.count,
            "rows_per_step": measured.rows_per_step,
            "failed": stats.failed,
        }
        runs.append(run)
        write_json({"name": args.name, "runs": runs}, args.out / f"server-{args.name}.json")
        print(_load_line(run), flush=True)
        if stats.failed:
            raise RuntimeError(f"{clients} clients: requests failed: {stats.failed}")


def _load_line(run: dict[str, Any]) -> str:
    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f} s"

    rows = run["rows_per_step"]
    return (
        f"  {run['clients']} clients: {run['images_per_s']:.3f} img/s, p50 {seconds(run['p50_s'])},"
        f" p95 {seconds(run['p95_s'])}, rows/step {'-' if rows is None else f'{rows:.2f}'}"
        f" ({run['samples']} samples)"
    )


def run_engine(args: argparse.Namespace) -> int:
    """`python -m bench mfu` on the check's model and size: the engine alone, eager (the
    server's default compile setting), into DIR/engine-NAME/."""
    from .cli import main

    width, height = args.resolution
    batch_sizes = args.batch_sizes or engine_batch_sizes(args.out, f"{width}x{height}")
    folder = args.out / f"engine-{args.name}"
    argv = [
        "mfu",
        "--model",
        str(args.model),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--torch-threads",
        str(args.torch_threads),
        "--settings",
        "eager",
        "--no-attention",
        "--resolutions",
        f"{width}x{height}",
        "--steps",
        str(args.steps),
        "--batch-sizes",
        ",".join(str(size) for size in batch_sizes),
        "--min-batches",
        "1",
        "--retries",
        str(args.retries),
        "--out",
        str(folder),
        "--markdown",
        str(folder / "mfu.md"),
    ]
    if args.peak_sizes:
        argv += ["--peak-sizes", args.peak_sizes]
    print("engine: python -m bench " + " ".join(argv), flush=True)
    return main(argv)


def engine_batch_sizes(out: Path, resolution: str) -> list[int]:
    """1, 2, 4, and 8 where the first start-up's memory probe said 8 rows fit at `resolution`
    (off CUDA there is no probe, and nothing bounds the batch)."""
    path = out / "startup-cold.json"
    caps = read_json(path)["max_batch_size"] if path.exists() else {}
    cap = caps.get(resolution)
    if cap is None or cap >= PROBED_BATCH:
        return [*ENGINE_BATCHES, PROBED_BATCH]
    return [size for size in ENGINE_BATCHES if size <= cap] or [1]
