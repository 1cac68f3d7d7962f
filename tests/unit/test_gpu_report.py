"""bench/gpu_report.py: the GPU check's report from its step files, failed steps named."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root holds bench/

from bench.gpu_report import read_steps, write_report


def steps_log(out: Path, *lines: tuple[str, str, float, int, int]) -> None:
    text = "".join("\t".join(str(field) for field in line) + "\n" for line in lines)
    (out / "steps.tsv").write_text(text)


def test_a_failed_or_timed_out_step_fails_the_report_by_name(tmp_path: Path) -> None:
    steps_log(
        tmp_path,
        ("info", "ok", 1.5, 20, 0),
        ("startup", "timeout", 100.0, 100, 124),
        ("engine", "failed", 3.2, 100, 1),
        ("lightning", "skipped", 0, 90, 0),
    )
    (tmp_path / "command.txt").write_text("scripts/gpu-check.sh OUT\n")
    assert write_report(tmp_path, docs=False) == 1
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert report["failed"] == ["startup", "engine"]
    assert [target["met"] for target in report["targets"]] == [None] * 4  # nothing measured
    summary = (tmp_path / "summary.md").read_text()
    assert "**Failed steps: startup, engine.**" in summary
    assert "| startup | timeout | 100.0 | 100 |" in summary


def test_a_run_whose_steps_passed_or_were_skipped_passes(tmp_path: Path) -> None:
    steps_log(tmp_path, ("info", "ok", 1.0, 20, 0), ("engine-1328", "skipped", 0, 60, 0))
    assert write_report(tmp_path, docs=False) == 0
    assert read_steps(tmp_path / "steps.tsv")[1] == {
        "name": "engine-1328",
        "status": "skipped",
        "seconds": 0.0,
        "budget_s": 60,
        "exit_code": 0,
    }
    assert "Every step passed." in (tmp_path / "summary.md").read_text()
