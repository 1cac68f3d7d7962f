"""`python -m bench COMMAND [OPTIONS]`: every benchmark behind one command line.

    python -m bench batching          # `make bench`: the engine's limit against three servers
    python -m bench adapters          # `make bench-adapters`: per-request LoRA adapters
    python -m bench variants          # `make bench-variants`: variants against fused servers
    python -m bench mfu               # `make bench-mfu`: the engine against the hardware peak
    python -m bench http              # light load: HTTP against gRPC and the engine alone
    python -m bench simulate          # the real scheduler on simulated cost curves (seconds)
    python -m bench gpu-check STEP    # a step of `make gpu-check` (scripts/gpu-check.sh)
    python -m bench tenants           # fair share between tenants vs first come first served
    python -m bench tenants-live      # the same on a real server (make bench-tenants)
    python -m bench COMMAND --help    # a command's options

A command is a module of this package with `add_arguments(parser)` and `run(args) -> int`. Only
the named command's module is imported: `simulate` needs no torch, and `--help` stays quick.
The options several commands share are declared here, once.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .workloads import parse_resolution


@dataclass(frozen=True, slots=True)
class Command:
    module: str  # with add_arguments(parser) and run(args) -> int
    summary: str  # its line in `python -m bench --help`
    make_target: str = ""  # the make target that runs it with no options ("" = none)


COMMANDS = {
    "batching": Command(
        "bench.batching",
        "the engine alone against naive, request- and step-level servers (make bench)",
        "bench",
    ),
    "adapters": Command(
        "bench.adapters",
        "per-request LoRA adapters: mixed in a batch or one per batch (make bench-adapters)",
        "bench-adapters",
    ),
    "variants": Command(
        "bench.variants",
        "three variants on one server against fused single-variant servers, one at a time"
        " (make bench-variants)",
        "bench-variants",
    ),
    "edits": Command(
        "bench.edits",
        "Edit-Plus with reference images: step- against request-level batching, engine limit"
        " (make bench-edits)",
        "bench-edits",
    ),
    "mfu": Command(
        "bench.mfu",
        "the engine against the device's matmul peak, by batch and compile setting "
        "(make bench-mfu)",
        "bench-mfu",
    ),
    "http": Command(
        "bench.http_latency",
        "light load over HTTP against gRPC and the engine alone (what HTTP and base64 cost)",
    ),
    "simulate": Command(
        "bench.simulate", "the server's scheduler on simulated cost curves (seconds, no torch)"
    ),
    "gpu-check": Command(
        "bench.gpu_check",
        "the steps of scripts/gpu-check.sh: info, server, engine, report (make gpu-check)",
    ),
    "tenants": Command(
        "bench.tenants", "fair share between tenants against first come first served (seconds)"
    ),
    "tenants-live": Command(
        "bench.tenants_live",
        "fair share against first come first served on a real server (make bench-tenants)",
        "bench-tenants",
    ),
    "naive-server": Command(
        "bench.naive_server", "the naive one-request-at-a-time server that `batching` measures"
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `COMMAND [OPTIONS]` (`argv`, else the process's arguments); returns its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    named = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(named).parse_args(argv)
    args.command_line = command_line(argv)
    return int(args.run(args))


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The parser of every command, with the options of `command` alone (see the docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, spec in COMMANDS.items():
        sub = commands.add_parser(
            name, help=spec.summary, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        if name == command:
            module = importlib.import_module(spec.module)
            sub.description = module.__doc__
            module.add_arguments(sub)
            sub.set_defaults(run=module.run)
    return parser


def command_line(argv: Sequence[str]) -> str:
    """How the results say they were made: the make target for a command run without options,
    else the command line."""
    target = COMMANDS[argv[0]].make_target if argv and argv[0] in COMMANDS else ""
    if target and len(argv) == 1:
        return f"make {target}"
    return " ".join(["python -m bench", *argv])


def add_engine_arguments(
    parser: argparse.ArgumentParser,
    model_default: Path | None,
    model_help: str,
    threads_default: int | None = 2,
) -> None:
    """--model, --device, --dtype and --torch-threads: what model runs where."""
    parser.add_argument("--model", type=Path, default=model_default, help=model_help)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument(
        "--dtype", default="auto", help="auto (bf16 on CUDA) | float32 | bfloat16 | float16"
    )
    threads = (
        "default 2 on a CPU, 0 on CUDA" if threads_default is None else f"default {threads_default}"
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=threads_default,
        help=f"torch CPU threads; 0 = torch's default ({threads})",
    )


def add_quick_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--quick", action="store_true", help=f"{what} (smoke check)")


def ints(text: str) -> list[int]:
    """argparse `type=` for `1,2,4` -> [1, 2, 4] (empty: [])."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers, e.g. 1,2,4") from None


def floats(text: str) -> list[float]:
    """argparse `type=` for `0.5,0.8` -> [0.5, 0.8] (empty: [])."""
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers, e.g. 0.5,0.8") from None


def resolution(text: str) -> tuple[int, int]:
    """argparse `type=` for one WIDTHxHEIGHT: a bad value is a usage error naming the option."""
    try:
        return parse_resolution(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def resolutions(text: str) -> list[tuple[int, int]]:
    """argparse `type=` for comma-separated WIDTHxHEIGHT values."""
    return [resolution(part) for part in text.split(",") if part.strip()]


def subset_of(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    """argparse `type=` for a comma-separated subset of `allowed`, returned in `allowed`'s order
    (the order the benchmarks run them in)."""

    def parse(text: str) -> list[str]:
        chosen = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [name for name in chosen if name not in allowed]
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {','.join(allowed)}")
        return [name for name in allowed if name in chosen]

    return parse
