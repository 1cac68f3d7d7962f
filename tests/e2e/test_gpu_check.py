"""scripts/gpu-check.sh's CPU dry run: every step of the GPU check runs, on the tiny model at
64x64 and 2 steps, and writes the JSON and markdown the GPU run will, so the script cannot rot
between the rare runs on a GPU. The optional larger-size and Lightning steps are skipped here to
keep the dry run short (they are the same two steps with other sizes and flags); the GPU run
reaches them when time is left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu-check.sh"
SCRIPT_TIMEOUT_S = 320  # above the dry run's own 300 s budget: the script bounds itself
pytestmark = pytest.mark.timeout(SCRIPT_TIMEOUT_S + 30)


def gpu_check(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), str(out), "--device", "cpu", *args],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
        check=False,
    )


@pytest.fixture(scope="module")
def dry_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("gpu-check")
    done = gpu_check(out, "--model", str(tiny_model), "--skip", "engine-1328,lightning")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report: dict[str, Any] = json.loads((out / "gpu-check.json").read_text())
    report["summary.md"] = (out / "summary.md").read_text()
    return report


def test_every_step_runs_and_is_logged_with_its_budget(dry_run: dict[str, Any]) -> None:
    steps = {step["name"]: step for step in dry_run["steps"]}
    required = ("info", "tests", "startup", "engine", "serve")
    assert [name for name in steps if name in required] == list(required)
    assert all(steps[name]["status"] == "ok" for name in required)
    assert all(0 < steps[name]["seconds"] <= steps[name]["budget_s"] for name in required)
    skipped = ("model", "engine-1328", "lightning")
    assert all(steps[name]["status"] == "skipped" for name in skipped)
    assert dry_run["failed"] == [] and dry_run["dry_run"] and dry_run["kind"] == "cpu"
    assert dry_run["info"]["torch"] and dry_run["info"]["transformers"]


def test_start_up_phases_come_from_the_server_metrics(dry_run: dict[str, Any]) -> None:
    for name in ("cold", "serve"):
        startup = dry_run["startup"][name]
        phases = startup["phases_s"]
        assert list(phases) == ["load", "probe", "compile", "warmup"]
        assert phases["load"] > 0 and phases["warmup"] > 0
        assert phases["probe"] == 0 and phases["compile"] == 0  # CPU: no probe; compile off
        assert startup["total_s"] > phases["load"] + phases["warmup"]
        assert startup["max_batch_size"] == {}  # the probe is CUDA-only


def test_the_engine_alone_reports_mfu_at_each_batch(dry_run: dict[str, Any]) -> None:
    engine = dry_run["engine"]
    assert engine["peak_tflops"] > 0 and engine["transformer_parameters"] > 0
    assert [p["batch_size"] for p in engine["points"]] == [1, 2]
    for point in engine["points"]:
        assert point["resolution"] == "64x64" and point["steps"] == 2
        assert point["ms_per_step"] > 0 and point["images_per_s"] > 0
        assert 0 < point["mfu"] < 1 and point["tflops"] > 0


def test_the_server_runs_against_the_engine_alone(dry_run: dict[str, Any]) -> None:
    runs = dry_run["server"]
    assert [run["clients"] for run in runs] == [1, 4, 16]
    for run in runs:
        assert run["images_per_s"] > 0 and run["samples"] > 0 and not run["failed"]
        assert run["p50_s"] is not None and run["p95_s"] >= run["p50_s"]
        assert 1 <= run["rows_per_step"] <= run["clients"]
        assert run["engine_batch"] == min(run["clients"], 2)  # the largest batch measured
        assert run["vs_engine"] == pytest.approx(run["images_per_s"] / run["engine_images_per_s"])
    assert runs[0]["engine_batch_s"] is not None  # the 1-client p50 is compared with it
    assert [target["met"] is not None for target in dry_run["targets"]] == [True] * 4


def test_the_summary_is_labelled_a_dry_run_with_every_table(dry_run: dict[str, Any]) -> None:
    summary = dry_run["summary.md"]
    assert "**CPU dry run, not a result.**" in summary
    assert "`scripts/gpu-check.sh OUT --device cpu --model DIR --skip" in summary
    for header in (
        "| target (GPU) |",
        "| step |",
        "| start-up |",
        "| resolution | steps | batch |",
    ):
        assert header in summary
    assert "| 64x64/2 | 16 |" in summary


def test_a_failed_step_is_named_and_the_script_exits_non_zero(tmp_path: Path) -> None:
    # An interpreter that fails at once: the step fails in milliseconds, and so does the report,
    # so the script's own step log names it (bench/gpu_report's naming: tests/unit).
    others = "tests,model,startup,engine,serve,engine-1328,lightning"
    done = subprocess.run(
        [str(SCRIPT), str(tmp_path), "--device", "cpu", "--skip", others],
        env={**os.environ, "PYTHON": "false"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "gpu-check: FAILED: info" in done.stderr
    steps = (tmp_path / "steps.tsv").read_text().splitlines()
    assert steps[0].split("\t")[:2] == ["info", "failed"]
    assert all(line.split("\t")[1] == "skipped" for line in steps[1:])
