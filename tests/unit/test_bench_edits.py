"""The edit benchmark's report, from results of the shape `bench edits` writes (no servers)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root holds bench/

from bench.edits import summary_lines
from bench.workloads import RequestClass, reference_pictures


def summary(system: str, clients: int, ips: float) -> dict[str, Any]:
    return {
        "system": system,
        "clients": clients,
        "throughput_ips": ips,
        "p50_s": 1.0,
        "p95_s": 2.0,
        "rows_per_step": 3.5 if system == "step" else 1.0,
        "requests": 10,
        "failed": 0,
    }


def test_the_report_compares_each_server_with_request_level_and_the_limit() -> None:
    results = {
        "command": "python -m bench edits",
        "wall_s": 600.0,
        "quick": False,
        "machine": {"date": "today", "cpu_model": "cpu", "logical_cores": 2, "torch": "2.13"},
        "settings": {"request": "256x256/8+2ref", "max_batch_size": 8},
        "limit": [
            {"batch_size": 1, "images_per_s": 0.1, "ms_per_step": 900.0},
            {"batch_size": 4, "images_per_s": 0.2, "ms_per_step": 1800.0},
        ],
        "summaries": [summary("step", 4, 0.18), summary("request", 4, 0.09)],
    }
    lines = summary_lines(results)
    assert "Engine alone: batch 1 0.100 img/s (900 ms/step), batch 4 0.200 img/s" in "\n".join(
        lines
    )
    assert "| step-level | 4 | 0.180 | 90% | 2.00 | 1.00 | 2.00 | 3.50 | 10 | 0 |" in lines


def test_edit_requests_carry_fixed_pictures() -> None:
    assert RequestClass(256, 256, 8, references=2).label == "256x256/8+2ref"
    pictures = reference_pictures(2)
    assert len(pictures) == 2 and pictures == reference_pictures(2)
    assert all(picture.startswith(b"\x89PNG") for picture in pictures)
