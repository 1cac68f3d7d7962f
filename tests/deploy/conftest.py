"""Fixtures for tests/deploy: rendered manifests and the command-line tools.

These tests need neither torch nor a server. The tools (promtool, checkov, shellcheck) come
from scripts/install-tools.sh into .tools/bin; a missing tool fails its tests, it does not skip
them, so CI cannot go green without running them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).resolve().parent
# The helper modules beside this file import as top-level modules under any pytest import mode.
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import kustomize_lite  # noqa: E402
from deploy_helpers import OBSERVABILITY, OVERLAYS, STANDALONE_MANIFESTS, Manifest, tool  # noqa: E402


@pytest.fixture(scope="session")
def promtool() -> Path:
    return tool("promtool")


@pytest.fixture(scope="session")
def checkov() -> Path:
    return tool("checkov")


@pytest.fixture(scope="session")
def shellcheck() -> Path:
    return tool("shellcheck")


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[Manifest]]:
    """Each overlay's manifests, rendered as `kubectl kustomize` would."""
    return {name: kustomize_lite.render(path) for name, path in OVERLAYS.items()}


@pytest.fixture(scope="session")
def rendered_observability() -> list[Manifest]:
    """deploy/observability's manifests (PrometheusRule, dashboard ConfigMap), rendered."""
    return kustomize_lite.render(OBSERVABILITY)


@pytest.fixture(scope="session")
def standalone() -> list[Manifest]:
    """The manifests applied with `kubectl apply -f` (deploy/k8s/jobs)."""
    return [
        doc for path in STANDALONE_MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc
    ]
