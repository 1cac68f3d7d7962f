"""Generated docs must not drift from their sources: docs/configuration.md from Settings, and
docs/gpu.md's GPU check section from the committed gpu-check JSON."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # the repository root holds bench/


def test_configuration_reference_matches_the_settings() -> None:
    spec = importlib.util.spec_from_file_location("configdoc", REPO / "scripts/configdoc.py")
    assert spec is not None and spec.loader is not None
    configdoc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(configdoc)
    committed = (REPO / "docs/configuration.md").read_text(encoding="utf-8")
    assert committed == configdoc.render(), "docs/configuration.md is stale: run `make docs`"


def test_the_gpu_section_matches_the_committed_gpu_check_json(tmp_path: Path) -> None:
    from bench.gpu_report import write_docs

    committed = REPO / "docs/gpu.md"
    regenerated = tmp_path / "gpu.md"
    regenerated.write_text(committed.read_text(encoding="utf-8"), encoding="utf-8")
    write_docs(regenerated)
    assert regenerated.read_text(encoding="utf-8") == committed.read_text(encoding="utf-8"), (
        "docs/gpu.md's GPU check section is stale: run `make gpu-check-docs`"
    )
