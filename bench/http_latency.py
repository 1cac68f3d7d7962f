"""Light load over HTTP, over gRPC and in the engine alone: what the HTTP layer and base64 cost.

    python -m bench http                         # 256x256, 8 steps, 8 rounds, the bench preset
    python -m bench http --quick                 # 3 rounds at 64x64 / 4 steps (a smoke check)

One step-level server subprocess with `--http-port 0`, and the engine in this process on the
same model. Each round sends one request to each side in turn (engine alone, gRPC `Generate`,
HTTP `POST /v1/images/generations` with the same parameters and PNG output), one at a time,
rotating the order from round to round so every side sees the same drift of the machine. The
p50 of each side is printed and written as JSON, with HTTP's and gRPC's time over the engine's.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import json
import statistics
import time
from pathlib import Path
from typing import Any

from .cli import add_engine_arguments, add_quick_argument, resolution
from .launch import HOST, ServerProcess
from .limit import EngineBench, adjacent_latency
from .machine import describe_machine
from .output import write_json
from .servers import DEFAULT_MODEL, ServerOptions, ensure_model, real_server_command, start_server
from .workloads import RequestClass

SIDES = ("engine", "grpc", "http")
PROMPT = "a lighthouse at dusk"
REQUEST_TIMEOUT_S = 600.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(
        parser, DEFAULT_MODEL, "model directory; the bench preset is written there if missing"
    )
    add_quick_argument(parser, "3 rounds at 64x64 and 4 steps")
    parser.add_argument("--resolution", type=resolution, default="256x256")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=8, help="requests per side")
    parser.add_argument(
        "--out", type=Path, default=Path(".cache/bench-http/results.json"), help="JSON results"
    )


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.resolution, args.steps, args.rounds = (64, 64), 4, 3
    ensure_model(args.model)
    results = asyncio.run(_measure(args))
    write_json(results, args.out)
    print(f"results: {args.out}")
    return 0


async def _measure(args: argparse.Namespace) -> dict[str, Any]:
    width, height = args.resolution
    cls = RequestClass(width, height, args.steps)
    engine = EngineBench(args.model, args.device, args.dtype, args.torch_threads)
    options = ServerOptions(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        torch_threads=args.torch_threads,
        max_batch_size=8,
        max_queue_size=8,
        default_width=width,
        default_height=height,
        default_steps=args.steps,
        min_size=min(width, height),
    )
    command = [*real_server_command(options, "step"), "--http-port", "0"]
    server = await start_server("step+http", command)
    try:
        seconds = _rounds(engine, server, cls, args.rounds)
    finally:
        server.stop()
    p50 = {side: statistics.median(values) for side, values in seconds.items()}
    for side in SIDES:
        over = p50[side] / p50["engine"] - 1
        print(f"  {side:6s} p50 {p50[side] * 1000:8.1f} ms ({over:+.1%} over the engine alone)")
    return {
        "command": args.command_line,
        "machine": describe_machine(args.torch_threads, args.device),
        "class": cls.label,
        "rounds": args.rounds,
        "p50_s": p50,
        "seconds": {
            side: [round(value, 4) for value in values] for side, values in seconds.items()
        },
    }


def _rounds(
    engine: EngineBench, server: ServerProcess, cls: RequestClass, rounds: int
) -> dict[str, list[float]]:
    from imagegen_client import ImageGenClient, OutputFormat

    seconds: dict[str, list[float]] = {side: [] for side in SIDES}
    body: dict[str, Any] = {
        "prompt": PROMPT,
        "size": f"{cls.width}x{cls.height}",
        "num_inference_steps": cls.steps,
        "output_format": "png",
    }
    with ImageGenClient(server.target, timeout_s=REQUEST_TIMEOUT_S) as client:
        for number in range(rounds):
            order = SIDES[number % 3 :] + SIDES[: number % 3]
            for side in order:
                if side == "engine":
                    seconds[side] += adjacent_latency(engine, cls, 1)
                    continue
                started = time.perf_counter()
                if side == "grpc":
                    client.generate(
                        PROMPT,
                        width=cls.width,
                        height=cls.height,
                        steps=cls.steps,
                        seed=number,
                        output_format=OutputFormat.PNG,
                    )
                else:
                    _post(server.http_port, {**body, "seed": number})
                seconds[side].append(time.perf_counter() - started)
    return seconds


def _post(port: int, body: dict[str, Any]) -> None:
    """One generation over HTTP, its image decoded from base64 as a client would."""
    connection = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT_S)
    try:
        connection.request(
            "POST",
            "/v1/images/generations",
            json.dumps(body),
            {"Content-Type": "application/json"},
        )
        response = connection.getresponse()
        answer = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {answer}")
        base64.b64decode(answer["data"][0]["b64_json"])
    finally:
        connection.close()
