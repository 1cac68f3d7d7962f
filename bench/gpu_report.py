"""`python -m bench gpu-check report`: one JSON and one markdown summary from the step files of
`scripts/gpu-check.sh`, and the generated GPU block of docs/gpu.md.

The script logs each step to `steps.tsv` (name, status, seconds, budget, exit code); the steps
write `info.json`, `startup-NAME.json`, `engine-NAME/mfu-KIND.json` and `server-NAME.json`.
`gpu-check.json` holds all of it with the comparisons the issue's targets read: MFU in the
denoising loop, the server at the most clients against the engine alone at the batch the server
can form, the 1-client p50 against the engine's batch-1 time, and the start-up with a warm cache.

docs/gpu.md shows the GPU run once one is committed (docs/benchmarks/gpu-check-cuda.json); until
then the CPU dry run, labelled as such: it only proves the script runs end to end.
"""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path
from typing import Any

from .output import read_json, write_block, write_json

SCHEMA = 1
DOCS = Path(__file__).resolve().parents[1] / "docs"
DOCS_MARKDOWN = DOCS / "gpu.md"
BLOCK = "gpu-check"
MAKE_TARGET = "gpu-check-docs"  # redoes the block from the committed JSON
# The targets (reported against, not blocking).
MFU_TARGET = 0.75
SERVER_FRACTION_TARGET = 0.95  # the most clients' images/s over the engine alone
LATENCY_TOLERANCE = 0.03  # 1-client p50 over the engine's batch-1 time, minus 1
WARM_STARTUP_TARGET_S = 120.0


def write_report(out: Path, docs: bool) -> int:
    """Writes `gpu-check.json` and `summary.md` into `out` (and, with `docs`, docs/gpu.md's
    block from it); returns 1 when a step failed, naming it."""
    report = build_report(out)
    write_json(report, out / "gpu-check.json")
    lines = summary_lines(report)
    (out / "summary.md").write_text("# GPU check\n\n" + "\n".join(lines) + "\n", encoding="utf-8")
    if docs:
        shutil.copyfile(out / "gpu-check.json", DOCS / "benchmarks" / docs_json_name(report))
        write_docs()
    print("\n".join(lines), flush=True)
    if report["failed"]:
        print(f"gpu-check: failed steps: {', '.join(report['failed'])}", flush=True)
        return 1
    return 0


def build_report(out: Path) -> dict[str, Any]:
    info = _read(out / "info.json") or {}
    kind = "cuda" if info.get("cuda_available") else "cpu"
    steps = read_steps(out / "steps.tsv")
    engine = _read(out / "engine-main" / f"mfu-{kind}.json")
    startups = {
        path.stem.removeprefix("startup-"): read_json(path)
        for path in sorted(out.glob("startup-*.json"))
    }
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "kind": kind,
        "dry_run": kind == "cpu",
        "command": (out / "command.txt").read_text().strip()
        if (out / "command.txt").exists()
        else "",
        "info": info,
        "steps": steps,
        "failed": [step["name"] for step in steps if step["status"] not in ("ok", "skipped")],
        "startup": startups,
        "engine": _engine_summary(engine),
        "server": _with_engine(_read(out / "server-serve.json"), engine),
        "extras": {
            "engine_1328": _engine_summary(_read(out / "engine-1328" / f"mfu-{kind}.json")),
            "lightning": (_read(out / "server-lightning.json") or {}).get("runs", []),
        },
    }
    report["targets"] = evaluate(report)
    return report


def read_steps(path: Path) -> list[dict[str, Any]]:
    """The script's step log: one tab-separated line per step."""
    if not path.exists():
        return []
    steps = []
    for line in path.read_text(encoding="utf-8").splitlines():
        name, status, seconds, budget, code = line.split("\t")
        steps.append(
            {
                "name": name,
                "status": status,  # ok | failed | timeout | skipped
                "seconds": float(seconds),
                "budget_s": int(budget),
                "exit_code": int(code),
            }
        )
    return steps


def _read(path: Path) -> dict[str, Any] | None:
    return read_json(path) if path.exists() else None


def _engine_summary(engine: dict[str, Any] | None) -> dict[str, Any] | None:
    """The `bench mfu` figures the report uses: the peak, the FLOPs and each point."""
    if engine is None:
        return None
    points = []
    for point in engine["points"]:
        seconds = point.get("batch_seconds") or []
        points.append(
            {
                key: point[key]
                for key in ("resolution", "steps", "batch_size", "images_per_s", "ms_per_step")
            }
            | {
                "tflops": point["tflops"],
                "mfu": point["mfu"],
                "batch_s": statistics.median(seconds) if seconds else None,
            }
        )
    return {
        "peak_tflops": engine["peak"]["tflops"],
        "flop_per_image_step": {e["resolution"]: e["flop_per_image_step"] for e in engine["flops"]},
        "transformer_parameters": engine["model"]["transformer_parameters"],
        "dtype": engine["model"]["dtype"],
        "points": points,
    }


def _with_engine(
    server: dict[str, Any] | None, engine: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """Each server run with the engine alone at the batch it can form: min(clients, the largest
    batch measured), and for one client the engine's batch-1 time next to the p50."""
    runs: list[dict[str, Any]] = (server or {}).get("runs", [])
    points = (_engine_summary(engine) or {}).get("points", [])
    for run in runs:
        same_size = [p for p in points if p["resolution"] == run["resolution"]]
        fitting = [p for p in same_size if p["batch_size"] <= run["clients"]]
        match = max(fitting, key=lambda point: point["batch_size"]) if fitting else None
        batch = match["batch_size"] if match else None
        run["engine_batch"] = batch
        run["engine_images_per_s"] = match["images_per_s"] if match else None
        run["vs_engine"] = (
            run["images_per_s"] / match["images_per_s"] if match and match["images_per_s"] else None
        )
        run["engine_batch_s"] = match["batch_s"] if match and batch == 1 else None
    return runs


def evaluate(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with its measured figure (None when the run has none)."""
    engine = report["engine"] or {"points": []}
    mfus = [p["mfu"] for p in engine["points"]]
    server = report["server"]
    most = max(server, key=lambda run: run["clients"]) if server else {}
    single: dict[str, Any] = next((run for run in server if run["clients"] == 1), {})
    latency = None
    if single.get("p50_s") and single.get("engine_batch_s"):
        latency = single["p50_s"] / single["engine_batch_s"] - 1
    warm = report["startup"].get("serve", {}).get("total_s")
    return [
        _target("best MFU in the denoising loop", max(mfus, default=None), MFU_TARGET, ">="),
        _target(
            f"server at {most.get('clients', '-')} clients over the engine alone",
            most.get("vs_engine"),
            SERVER_FRACTION_TARGET,
            ">=",
        ),
        _target("1-client p50 over the engine's batch-1 time, minus 1", latency, LATENCY_TOLERANCE),
        _target("start-up with a warm compile cache (s)", warm, WARM_STARTUP_TARGET_S),
    ]


def _target(name: str, value: float | None, bound: float, sense: str = "<=") -> dict[str, Any]:
    met = None if value is None else (value >= bound if sense == ">=" else value <= bound)
    return {"name": name, "value": value, "target": f"{sense} {bound:g}", "met": met}


def write_docs(markdown: Path = DOCS_MARKDOWN) -> int:
    """Rewrites the generated block of `markdown` (docs/gpu.md) from the committed JSON."""
    write_block(markdown, BLOCK, MAKE_TARGET, docs_lines())
    return 0


def docs_json_name(report: dict[str, Any]) -> str:
    return f"gpu-check-{report['kind']}.json"


def docs_lines(docs: Path = DOCS) -> list[str]:
    """docs/gpu.md's generated block: the GPU run's summary if one is committed, else the CPU
    dry run's, labelled as one."""
    gpu = docs / "benchmarks" / "gpu-check-cuda.json"
    dry = docs / "benchmarks" / "gpu-check-cpu.json"
    if gpu.exists():
        return summary_lines(read_json(gpu))
    if dry.exists():
        return summary_lines(read_json(dry))
    return ["No run of `scripts/gpu-check.sh` is committed yet."]


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The markdown of one run: what ran where, then the tables (see `tables`)."""
    from .gpu_tables import tables

    info = report["info"]
    versions = (
        f"torch {info.get('torch')}, diffusers {info.get('diffusers')}, "
        f"transformers {info.get('transformers')}, peft {info.get('peft')}"
    )
    command = f"`{report['command']}`" if report["command"] else "scripts/gpu-check.sh"
    when = str(info.get("date", ""))[:10]
    if report["dry_run"]:
        head = [
            "**CPU dry run, not a result.** No GPU run is committed yet. This is the script's "
            f"dry run on {info.get('cpu_model')} ({info.get('logical_cores')} cores, {versions}),"
            f" made {when} with {command}: the tiny random-weight model at a small size, a "
            "few seconds a step. It shows that every step runs and what the GPU run will "
            "report; none of its figures says anything about serving speed.",
        ]
    else:
        head = [
            f"Measured {when} on **{info.get('gpu')}** ({info.get('gpu_memory_gib')} GiB, driver "
            f"{info.get('driver')}, CUDA {info.get('cuda')}, {versions}) with {command}, on "
            "the full-size random-weight stand-in (`tiny-model --preset full`: Qwen-Image's "
            "real sizes, random bf16 weights drawn on the GPU).",
        ]
    failed = report["failed"]
    status = [f"**Failed steps: {', '.join(failed)}.**" if failed else "Every step passed."]
    return [*head, "", *status, "", *tables(report)]
