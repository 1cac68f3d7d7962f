"""The generated docs must not drift from the code: docs/configuration.md and the limits table
of docs/security.md are both written from Settings by scripts/configdoc.py (`make docs`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


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
