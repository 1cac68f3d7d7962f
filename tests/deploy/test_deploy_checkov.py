"""checkov (Kubernetes and Dockerfile policies) passes, skips explained in deploy/checkov.yaml."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from deploy_helpers import (
    DEPLOY,
    DOCKERFILE,
    OBSERVABILITY,
    OVERLAYS,
    STANDALONE_MANIFESTS,
    kustomize_yaml,
    run,
)

CONFIG = DEPLOY / "checkov.yaml"
_SKIP_LINE = re.compile(r"^\s*-\s*(CKV\w+)\s*$")


def explained_skips() -> dict[str, str]:
    """Return the skipped check ids of deploy/checkov.yaml with the comment above each."""
    lines = CONFIG.read_text().splitlines()
    skips = {}
    for i, line in enumerate(lines):
        match = _SKIP_LINE.match(line)
        if match:
            reason = []
            j = i - 1
            while j >= 0 and lines[j].lstrip().startswith("#"):
                reason.insert(0, lines[j].lstrip("# ").strip())
                j -= 1
            skips[match.group(1)] = " ".join(reason)
    return skips


def scan_dir(tmp_path: Path) -> Path:
    """Write what checkov should scan into one directory: rendered manifests and the Dockerfile."""
    for name, path in {**OVERLAYS, "observability": OBSERVABILITY}.items():
        (tmp_path / f"{name}.yaml").write_text(kustomize_yaml(path))
    for path in STANDALONE_MANIFESTS:
        shutil.copy(path, tmp_path / f"jobs-{path.name}")
    shutil.copy(DOCKERFILE, tmp_path / "Dockerfile")
    return tmp_path


def test_every_skip_has_a_reason() -> None:
    skips = explained_skips()
    assert skips, "deploy/checkov.yaml skips nothing: remove this test's premise or the file"
    for check, reason in skips.items():
        assert len(reason) > 20, f"{check} is skipped without a reason in deploy/checkov.yaml"


def test_failures_are_exactly_the_explained_skips(checkov: Path, tmp_path: Path) -> None:
    directory = scan_dir(tmp_path)
    result = run(
        checkov,
        "-d",
        directory,
        "--framework",
        "kubernetes",
        "dockerfile",
        "-o",
        "json",
        "--skip-download",
    )
    assert result.returncode in (0, 1), result.stderr[-3000:]
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert {r["check_type"] for r in reports} == {"kubernetes", "dockerfile"}
    failed: dict[str, list[str]] = {}
    for report in reports:
        assert report["summary"]["parsing_errors"] == 0, report["check_type"]
        assert report["summary"]["resource_count"] > 0, report["check_type"]
        for check in report["results"]["failed_checks"]:
            failed.setdefault(check["check_id"], []).append(
                f"{check['resource']}: {check['check_name']}"
            )
    skips = explained_skips()
    unexplained = {k: v for k, v in failed.items() if k not in skips}
    assert not unexplained, f"checkov failures not skipped in deploy/checkov.yaml: {unexplained}"
    stale = set(skips) - set(failed)
    assert not stale, f"skips in deploy/checkov.yaml that no longer fail; remove them: {stale}"


def test_checkov_passes_with_the_config_file(checkov: Path, tmp_path: Path) -> None:
    result = run(checkov, "--config-file", CONFIG, "-d", scan_dir(tmp_path), "--compact", "--quiet")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
