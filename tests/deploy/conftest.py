"""Fixtures for tests/deploy: rendered manifests and the command-line tools.

These tests need neither torch nor a server. The tools (promtool, checkov, shellcheck) come
from scripts/install-tools.sh into .tools/bin; a missing tool fails its tests, it does not skip
them, so CI cannot go green without running them. The manifests are rendered by the system's
`kubectl kustomize` (kustomize v5): without it those tests skip, and .ci/run refuses to start.
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

from deploy_helpers import (  # noqa: E402
    OBSERVABILITY,
    OVERLAYS,
    STANDALONE_MANIFESTS,
    Manifest,
    kustomize,
    tool,
)


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
    """Each overlay's manifests, rendered by `kubectl kustomize`."""
    return {name: kustomize(path) for name, path in OVERLAYS.items()}


@pytest.fixture(scope="session")
def rendered_observability() -> list[Manifest]:
    """deploy/observability's manifests (PrometheusRule, dashboard ConfigMap), rendered."""
    return kustomize(OBSERVABILITY)


@pytest.fixture(scope="session")
def standalone() -> list[Manifest]:
    """The manifests applied with `kubectl apply -f` (deploy/k8s/jobs)."""
    return [
        doc for path in STANDALONE_MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc
    ]
