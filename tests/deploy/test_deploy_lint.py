"""Lint: yamllint on deploy/ (deploy/.yamllint), ShellCheck on the scripts CI runs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from deploy_helpers import DEPLOY, REPO, run

SCRIPTS = [
    REPO / "scripts" / "install-tools.sh",
    REPO / "scripts" / "buf-breaking.sh",
    REPO / "scripts" / "gpu-check.sh",
    REPO / ".ci" / "run",
]


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


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_pass_shellcheck(shellcheck: Path, script: Path) -> None:
    result = run(shellcheck, script)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_executable(script: Path) -> None:
    assert os.access(script, os.X_OK)
