"""The markdown tables of a `scripts/gpu-check.sh` run (bench/gpu_report.py builds the report)."""

from __future__ import annotations

from typing import Any

from .output import fmt

PHASES = ("load", "probe", "compile", "warmup")


def tables(report: dict[str, Any]) -> list[str]:
    """Targets, steps, start-up phases, the engine alone, the server against it, the extras."""
    lines = [*_targets(report["targets"], report["dry_run"]), "", *_steps(report["steps"])]
    if report["startup"]:
        lines += ["", *_startup(report["startup"])]
    if report["engine"]:
        lines += ["", *_engine("Engine alone", report["engine"])]
    if report["server"]:
        lines += ["", *_server("Server, closed-loop clients", report["server"])]
    extras = report["extras"]
    if extras["engine_1328"]:
        lines += ["", *_engine("Engine alone, the larger size", extras["engine_1328"])]
    if extras["lightning"]:
        lines += ["", *_server("Server, Lightning preset", extras["lightning"])]
    return lines


def _targets(targets: list[dict[str, Any]], dry_run: bool) -> list[str]:
    """The issue's targets; a dry run's figures are not held against them."""
    lines = ["| target (GPU) | measured | bound | met |", "|---|---:|---:|---|"]
    for target in targets:
        met = {True: "yes", False: "**no**", None: "not measured"}[target["met"]]
        if dry_run:
            met = "n/a (CPU dry run)"
        lines.append(
            f"| {target['name']} | {fmt(target['value'], '.3f')} | {target['target']} | {met} |"
        )
    return lines


def _steps(steps: list[dict[str, Any]]) -> list[str]:
    lines = ["| step | status | seconds | budget (s) |", "|---|---|---:|---:|"]
    for step in steps:
        lines.append(
            f"| {step['name']} | {step['status']} | {step['seconds']:.1f} | {step['budget_s']} |"
        )
    return lines


def _startup(startups: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "| start-up | load (s) | memory probe (s) | compile (s) | warm-up (s) | to SERVING (s) "
        "| most images per step |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, startup in startups.items():
        phases = " | ".join(f"{startup['phases_s'][phase]:.1f}" for phase in PHASES)
        caps = ", ".join(f"{size}: {rows}" for size, rows in startup["max_batch_size"].items())
        lines.append(f"| {name} | {phases} | {startup['total_s']:.1f} | {caps or '-'} |")
    return lines


def _engine(title: str, engine: dict[str, Any]) -> list[str]:
    lines = [
        f"{title}: peak {engine['peak_tflops']:.3g} TFLOP/s (the best {engine['dtype']} "
        f"matmul measured on the device), transformer of "
        f"{_parameters(engine['transformer_parameters'])} parameters.",
        "",
        "| resolution | steps | batch | ms/step | images/s | TFLOP/s | MFU |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for point in engine["points"]:
        lines.append(
            f"| {point['resolution']} | {point['steps']} | {point['batch_size']} | "
            f"{point['ms_per_step']:.1f} | {point['images_per_s']:.3f} | "
            f"{point['tflops']:.3g} | {point['mfu']:.3f} |"
        )
    return lines


def _server(title: str, runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        f"{title}:",
        "",
        "| resolution | clients | images/s | p50 (s) | p95 (s) | rows/step | engine alone "
        "(batch) | server / engine |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        engine = run.get("engine_images_per_s")
        batch = f"{fmt(engine, '.3f')} ({run.get('engine_batch') or '-'})"
        lines.append(
            f"| {run['resolution']}/{run['steps']} | {run['clients']} | "
            f"{run['images_per_s']:.3f} | {fmt(run['p50_s'])} | {fmt(run['p95_s'])} | "
            f"{fmt(run['rows_per_step'])} | {batch if engine else '-'} | "
            f"{fmt(run.get('vs_engine'), '.3f')} |"
        )
    return lines


def _parameters(count: int) -> str:
    """20.4 B for the full-size stand-in, 92.4 k for the tiny model."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if count >= scale:
            return f"{count / scale:.3g} {unit}"
    return str(count)
