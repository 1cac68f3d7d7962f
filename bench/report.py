"""The batching benchmark's report: its generated block of docs/benchmarks.md, from its JSON.

`python -m bench batching --report-only FILE` redoes it without measuring.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .output import fmt, write_block

JSON_NAME = "results.json"
PLOT_NAME = "results.png"
SYSTEM_NAMES = {
    "naive": "naive",
    "request": "request-level",
    "step": "step-level",
    "step-all": "step-level, all rows",
}


def update_markdown(results: dict[str, Any], markdown: Path, out_dir: Path) -> None:
    """Replaces the generated block of `markdown` (the file is created if missing)."""
    write_block(markdown, "bench", "bench", summary_lines(results, markdown, out_dir))


def summary_lines(results: dict[str, Any], markdown: Path, out_dir: Path) -> list[str]:
    machine = results["machine"]
    settings = results["settings"]
    limit = results["limit"]
    relative = _relative(out_dir, markdown.parent)
    lines = [
        f"Measured {machine['date']} with `{results['command']}` "
        f"({results['wall_s'] / 60:.1f} min{', quick mode' if results['quick'] else ''}).",
        "",
        f"Machine: {machine['cpu_model']}, {machine['logical_cores']} logical cores, "
        f"{machine['memory_gib']} GiB; {machine['platform']}; Python {machine['python']}, "
        f"torch {machine['torch']}, diffusers {machine['diffusers']}, grpcio {machine['grpcio']}; "
        f"{machine['torch_threads']} torch threads on {machine['device']}"
        + (f" ({machine['gpu']})" if "gpu" in machine else "")
        + f"; load average at start {machine['load_average_at_start']}.",
        "",
        f"Model: {settings.get('model', 'the `bench` preset of the random-weight model')}. "
        f"Single workload: "
        f"{settings['single']}; mix: {settings['mix']} (uniform). Servers: "
        f"`--max-batch-size {settings['max_batch_size']} --max-queue-size "
        f"{settings['max_queue_size']} --torch-threads {settings['torch_threads']}`, other "
        f"settings at their defaults. Raw data: [{JSON_NAME}]({relative}/{JSON_NAME}).",
        "",
        "### Targets",
        "",
        "| target | goal | measured | result | figures |",
        "| --- | --- | --- | --- | --- |",
    ]
    for target in results["targets"]:
        value = fmt(target["value"], ".3f")
        lines.append(
            f"| {target['name']} | {target['goal']} | {value} | **{target['verdict']}** "
            f"| {target['figures']} |"
        )
    lines += [
        "",
        f"### Limit: the engine alone ({limit['sweep'][0]['label']})",
        "",
        "| batch size | images/s | ms/step | ms/step/row | text / denoise / decode | batches |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for point in limit["sweep"]:
        share = point["stage_share"]
        split = " / ".join(
            f"{share.get(stage, 0):.0%}" for stage in ("text_encode", "denoise_step", "vae_decode")
        )
        best = " (best)" if point["batch_size"] == limit["best_batch_size"] else ""
        lines.append(
            f"| {point['batch_size']}{best} | {point['images_per_s']:.3f} | "
            f"{point['ms_per_step']:.1f} | {point['ms_per_step'] / point['batch_size']:.1f} | "
            f"{split} | {len(point['batch_seconds'])} |"
        )
    lines += [
        "",
        f"Limit {limit['limit_ips']:.3f} images/s (batch {limit['best_batch_size']}); engine-alone "
        f"latency (batch 1, median) {limit['latency_s'] * 1000:.0f} ms.",
    ]
    if limit["mix"]:
        parts = ", ".join(f"{p['label']} {p['images_per_s']:.3f}" for p in limit["mix"])
        lines.append(
            f"Mix limit {limit['mix_limit_ips']:.3f} images/s at batch {limit['best_batch_size']} "
            f"(per class, images/s: {parts})."
        )
    for workload in ("single", "mix"):
        lines += _load_table(results, workload, "closed") + _load_table(results, workload, "open")
    lines += [
        "",
        f"![throughput and latency]({relative}/{PLOT_NAME})",
        "",
        _background_note(results),
    ]
    return lines


def _load_table(results: dict[str, Any], workload: str, kind: str) -> list[str]:
    """The closed-loop (`kind` "closed") or open-loop ("open") table of one workload."""
    runs = [r for r in results["runs"] if r["workload"] == workload and r["kind"] == kind]
    if not runs:
        return []
    per_steps = workload == "mix"
    steps_head, steps_rule = _steps_header(results) if per_steps else ("", "")
    title, level = (
        ("Closed loop", "clients") if kind == "closed" else ("Open loop (Poisson)", "offered")
    )
    lines = [
        "",
        f"### {title}, {workload} workload",
        "",
        f"| system | {level} | images/s | x limit | p50 s | p95 s | p99 s | queue s | rows/step"
        f"{steps_head} | n | failed | other CPU |",
        f"| --- | --- | --- | --- | --- | --- | --- | --- | ---{steps_rule} | --- | --- | --- |",
    ]
    for run in runs:
        lines.append(_row(results, run, _level(run), per_steps))
    return lines


def _level(run: dict[str, Any]) -> str:
    if run["kind"] == "closed":
        return str(run["clients"])
    return f"{run['fraction']:.0%} ({run['offered_ips']:.2f}/s, {run['arrivals']} req)"


def _steps_header(results: dict[str, Any]) -> tuple[str, str]:
    steps = results["settings"]["mix_steps"]
    head = "".join(f" | {s}-step p50 / p95 s" for s in steps)
    return head, " | ---" * len(steps)


def _row(results: dict[str, Any], run: dict[str, Any], level: str, per_steps: bool) -> str:
    stats = run["stats"]
    latency = stats["latency"]
    cells = [
        SYSTEM_NAMES.get(run["system"], run["system"]),
        level,
        f"{stats['throughput_ips']:.3f}",
        f"{stats['throughput_ips'] / run['limit_ips']:.2f}",
        fmt(latency["p50"]),
        fmt(latency["p95"]),
        fmt(latency["p99"]),
        fmt(stats["queue_mean_s"]),
        fmt(run["rows_per_step"]),
    ]
    if per_steps:
        for steps in results["settings"]["mix_steps"]:
            summary = stats["latency_by_steps"].get(str(steps))
            cells.append(
                "n/a" if summary is None else f"{fmt(summary['p50'])} / {fmt(summary['p95'])}"
            )
    unfinished = latency["unfinished"]
    failed = sum(stats["failed"].values())
    failed_text = (
        str(failed) if not failed else ", ".join(f"{k} {v}" for k, v in stats["failed"].items())
    )
    cells += [
        f"{latency['count']}" + (f" (+{unfinished} unfinished)" if unfinished else ""),
        failed_text,
        f"{run['cpu']['background']:.2f}",
    ]
    return "| " + " | ".join(cells) + " |"


def _background_note(results: dict[str, Any]) -> str:
    busy = [r for r in results["runs"] if r["cpu"]["background"] > 0.25]
    note = (
        "`other CPU`: cores used by processes other than the bench and the server under test "
        "during the run (from /proc/stat); above ~0.25 on this machine, that run's numbers are "
        "disturbed. `n/a` percentiles fall among unfinished requests (cut at the drain cap). "
        "`queue s`: mean server-reported queue time. `rows/step`: from the server's "
        "`imagegen_batch_size` histogram over the run."
    )
    if busy:
        names = ", ".join(
            f"{r['system']}/{r['workload']}/{r['kind']} {r['clients'] or r['fraction']}"
            for r in busy
        )
        note += f" Runs with background load: {names}."
    return note


def _relative(target: Path, start: Path) -> str:
    try:
        return str(target.resolve().relative_to(start.resolve()))
    except ValueError:
        return str(target.resolve())


def print_targets(targets: list[dict[str, Any]]) -> None:
    """The targets of a results JSON, one verdict a line, with the figures behind it."""
    for target in targets:
        print(
            f"{target['verdict']:7} {target['name']}: {fmt(target['value'], '.3f')} "
            f"(goal: {target['goal']})"
        )
        if target["figures"]:
            print(f"        {target['figures']}")
