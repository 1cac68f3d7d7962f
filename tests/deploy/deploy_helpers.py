"""Paths and small helpers shared by tests/deploy (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEPLOY = REPO / "deploy"
TOOLS_BIN = REPO / ".tools" / "bin"

OVERLAYS = {
    "cpu-tiny": DEPLOY / "k8s" / "overlays" / "cpu-tiny",
    "gpu": DEPLOY / "k8s" / "overlays" / "gpu",
}
BASE = DEPLOY / "k8s" / "base"
OBSERVABILITY = DEPLOY / "observability"
# Applied with `kubectl apply -f`, outside any kustomization.
STANDALONE_MANIFESTS = [DEPLOY / "k8s" / "jobs" / "model-download.yaml"]
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"

Manifest = dict[str, Any]


def tool(name: str) -> Path:
    """Return the path of .tools/bin/`name`; fail the calling test if it is not installed."""
    path = TOOLS_BIN / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(
            f"{name} is not installed at {path}: run scripts/install-tools.sh", pytrace=False
        )
    return path


def run(*args: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """Run a command to completion and return its result, output captured as text."""
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, check=False
    )


def find(manifests: list[Manifest], kind: str, name: str | None = None) -> list[Manifest]:
    """Return the manifests of `kind` (and `name`, if given)."""
    return [
        m
        for m in manifests
        if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)
    ]


def one(manifests: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    """Return the single manifest of `kind` (and `name`); fail unless there is exactly one."""
    found = find(manifests, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]
