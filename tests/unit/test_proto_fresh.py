"""The committed generated code is exactly what protos/ generates (never stale, never edited)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_generated_modules_match_the_proto(tmp_path: Path) -> None:
    written = subprocess.run(
        [sys.executable, str(REPO / "scripts/protogen.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert written, "protogen wrote nothing"
    for path in map(Path, written):
        committed = REPO / "client" / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing: run `make proto`"
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed} is stale: run `make proto`"
        )
