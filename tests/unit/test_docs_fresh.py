"""docs/configuration.md is generated from Settings; it must not drift from the code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_configuration_reference_matches_the_settings() -> None:
    spec = importlib.util.spec_from_file_location("configdoc", REPO / "scripts/configdoc.py")
    assert spec is not None and spec.loader is not None
    configdoc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(configdoc)
    committed = (REPO / "docs/configuration.md").read_text(encoding="utf-8")
    assert committed == configdoc.render(), "docs/configuration.md is stale: run `make docs`"
