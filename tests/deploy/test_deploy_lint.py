"""Lint: yamllint on deploy/ (deploy/.yamllint), ShellCheck on scripts/install-tools.sh."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from deploy_helpers import DEPLOY, REPO, run

INSTALL_TOOLS = REPO / "scripts" / "install-tools.sh"


def test_yamllint_is_clean() -> None:
    result = run(sys.executable, "-m", "yamllint", "--strict", "-c", DEPLOY / ".yamllint", DEPLOY)
    assert result.returncode == 0, result.stdout + result.stderr


def test_yamllint_config_catches_what_it_should(tmp_path: Path) -> None:
    # `yes` is a boolean to some YAML parsers and a string to others; 0440 may be octal.
    bad = tmp_path / "bad.yaml"
    bad.write_text("enabled: yes\nmode: 0440\n")
    result = run(sys.executable, "-m", "yamllint", "--strict", "-c", DEPLOY / ".yamllint", bad)
    assert result.returncode != 0
    assert "truthy" in result.stdout and "octal-values" in result.stdout


def test_install_tools_passes_shellcheck(shellcheck: Path) -> None:
    result = run(shellcheck, INSTALL_TOOLS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_install_tools_is_executable() -> None:
    assert os.access(INSTALL_TOOLS, os.X_OK)
