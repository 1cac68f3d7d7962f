"""Generated docs must not drift from their sources: docs/configuration.md and the limits table
of docs/security.md from Settings (scripts/configdoc.py, `make docs`), and docs/gpu.md's GPU
check section from the committed gpu-check JSON."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # the repository root holds bench/


def configdoc() -> ModuleType:
    spec = importlib.util.spec_from_file_location("configdoc", REPO / "scripts/configdoc.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_matches_the_settings() -> None:
    committed = (REPO / "docs/configuration.md").read_text(encoding="utf-8")
    assert committed == configdoc().render(), "docs/configuration.md is stale: run `make docs`"


def test_security_limits_table_matches_the_settings() -> None:
    committed = (REPO / "docs/security.md").read_text(encoding="utf-8")
    regenerated = configdoc().render_security(committed)
    assert committed == regenerated, "docs/security.md's limits table is stale: run `make docs`"


def test_the_gpu_section_matches_the_committed_gpu_check_json(tmp_path: Path) -> None:
    from bench.gpu_report import write_docs

    committed = REPO / "docs/gpu.md"
    regenerated = tmp_path / "gpu.md"
    regenerated.write_text(committed.read_text(encoding="utf-8"), encoding="utf-8")
    write_docs(regenerated)
    assert regenerated.read_text(encoding="utf-8") == committed.read_text(encoding="utf-8"), (
        "docs/gpu.md's GPU check section is stale: run `make gpu-check-docs`"
    )
