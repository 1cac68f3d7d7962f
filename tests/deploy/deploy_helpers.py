"""Paths and small helpers shared by tests/deploy (fixtures live in conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

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

# The kustomize that renders deploy/ here: v5, as `kubectl apply -k` has it from kubectl 1.27.
# kubectl 1.20's kustomize (v2) lacks the `patches` field that deploy/ uses.
MIN_KUSTOMIZE_MAJOR = 5


def tool(name: str) -> Path:
    """Return the path of .tools/bin/`name`; fail the calling test if it is not installed."""
    path = TOOLS_BIN / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(
            f"{name} is not installed at {path}: run scripts/install-tools.sh", pytrace=False
        )
    return path


@cache
def _kustomize_unavailable() -> str | None:
    """Say why `kubectl kustomize` cannot render deploy/ here, or None if it can."""
    if shutil.which("kubectl") is None:
        return "kubectl is not installed (.ci/run requires it, so CI does not skip)"
    result = run("kubectl", "version", "--client", "-o", "json")
    if result.returncode != 0:
        return f"`kubectl version --client` failed: {result.stderr.strip()}"
    version = json.loads(result.stdout).get("kustomizeVersion", "")
    major = version.removeprefix("v").split(".")[0]
    if not (major.isdigit() and int(major) >= MIN_KUSTOMIZE_MAJOR):
        return f"kubectl's kustomize is {version or 'unknown'}, older than v{MIN_KUSTOMIZE_MAJOR}"
    return None


def kustomize_yaml(directory: Path) -> str:
    """Return `kubectl kustomize directory`'s output; skip the calling test without kubectl.

    Raises:
        AssertionError: kustomize refused the kustomization (its message included).
    """
    reason = _kustomize_unavailable()
    if reason is not None:
        pytest.skip(f"cannot render {directory}: {reason}")
    result = run("kubectl", "kustomize", directory)
    assert result.returncode == 0, f"kubectl kustomize {directory}: {result.stderr}"
    return result.stdout


def kustomize(directory: Path) -> list[Manifest]:
    """Return the manifests that `kubectl kustomize directory` renders, in its order."""
    return [doc for doc in yaml.safe_load_all(kustomize_yaml(directory)) if doc]


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
