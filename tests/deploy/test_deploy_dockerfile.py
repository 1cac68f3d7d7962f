"""deploy/docker/Dockerfile: targets, user, signals, writable paths, build context.

docker cannot run here, so the Dockerfile is checked as parsed text (dockerfile-parse), plus
checkov's Dockerfile policies in test_deploy_checkov.py.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import pytest
from deploy_contract import APP_UID, GRPC_PORT, HTTP_PORT, METRICS_PORT
from deploy_helpers import DOCKERFILE, REPO
from dockerfile_parse import DockerfileParser

TARGETS = {
    "cpu": "cpu-build",
    "gpu": "gpu-build",
}  # runtime target -> the stage that builds its venv
DOCKERIGNORE = DOCKERFILE.with_name(DOCKERFILE.name + ".dockerignore")


@dataclass(slots=True)
class Stage:
    name: str  # the stage's AS name
    base: str  # image or earlier stage it starts FROM
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, value)

    def values(self, instruction: str) -> list[str]:
        return [value for name, value in self.instructions if name == instruction]


def parse_stages() -> dict[str, Stage]:
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for item in DockerfileParser(path=str(DOCKERFILE)).structure:
        instruction, value = item["instruction"], item["value"]
        if instruction == "FROM":
            words = value.split()
            assert len(words) == 3 and words[1].upper() == "AS", (
                f"every FROM names its stage: {value}"
            )
            current = Stage(name=words[2], base=words[0])
            stages[current.name] = current
        elif current is not None:
            current.instructions.append((instruction, value))
    return stages


STAGES = parse_stages()


def root_image(stage: Stage) -> str:
    while stage.base in STAGES:
        stage = STAGES[stage.base]
    return stage.base


def env_of(stage: Stage) -> dict[str, str]:
    """The stage's environment, inherited from the stages it builds on."""
    chain = [stage]
    while chain[-1].base in STAGES:
        chain.append(STAGES[chain[-1].base])
    env: dict[str, str] = {}
    for link in reversed(chain):
        for value in link.values("ENV"):
            for word in shlex.split(value):
                key, _, val = word.partition("=")
                env[key] = val
    return env


def copy_sources(stage: Stage) -> list[tuple[str | None, str]]:
    """Return (from-stage or None, source path) for each COPY source of the stage."""
    found = []
    for value in stage.values("COPY"):
        words = shlex.split(value)
        source_stage = None
        while words[0].startswith("--"):
            flag = words.pop(0)
            if flag.startswith("--from="):
                source_stage = flag.removeprefix("--from=")
        found.extend((source_stage, source) for source in words[:-1])
    return found


def test_targets_and_build_stages_exist() -> None:
    for target, build in TARGETS.items():
        assert target in STAGES and build in STAGES
        # The venv links to its image's Python: it must run on the same base it was built on.
        assert root_image(STAGES[target]) == root_image(STAGES[build])
        assert (build, "/opt/venv") in copy_sources(STAGES[target])


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_runtime_stage_contract(target: str) -> None:
    stage = STAGES[target]
    [user] = stage.values("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) == APP_UID and gid == uid, "USER must be numeric and non-root"
    [entrypoint] = stage.values("ENTRYPOINT")
    assert json.loads(entrypoint) == ["imagegen-server"]
    [cmd] = stage.values("CMD")
    args = json.loads(cmd)
    assert args[0] == "serve"
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert stage.values("STOPSIGNAL") == ["SIGTERM"]
    exposed = {int(p.split("/")[0]) for value in stage.values("EXPOSE") for p in value.split()}
    assert exposed == {GRPC_PORT, HTTP_PORT, METRICS_PORT}


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_writes_only_to_declared_volumes(target: str) -> None:
    stage = STAGES[target]
    env = env_of(stage)
    volumes = {v for value in stage.values("VOLUME") for v in json.loads(value)}
    assert "/tmp" in volumes
    assert any(PurePosixPath(env["HF_HOME"]).is_relative_to(v) for v in volumes), (
        "HF_HOME must be on a volume"
    )
    assert PurePosixPath(env["HOME"]).is_relative_to("/tmp")
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"


def test_no_healthcheck() -> None:
    # Kubernetes probes grpc.health.v1; Docker's HEALTHCHECK would be ignored there.
    assert not any(stage.values("HEALTHCHECK") for stage in STAGES.values())


def test_base_images_have_fixed_tags() -> None:
    for stage in STAGES.values():
        if stage.base not in STAGES:
            _, _, tag = stage.base.rpartition(":")
            assert tag and tag != "latest" and "$" not in stage.base, stage.base


@pytest.mark.parametrize("build", sorted(TARGETS.values()))
def test_torch_is_installed_before_the_package(build: str) -> None:
    runs = STAGES[build].values("RUN")
    torch = next(i for i, cmd in enumerate(runs) if '"torch==' in cmd)
    package = next(i for i, cmd in enumerate(runs) if '".[server]"' in cmd)
    assert torch < package, (
        "torch first, so that installing the package does not pick another build"
    )


def test_cpu_torch_comes_from_the_cpu_index() -> None:
    args = [v for v in STAGES["cpu-build"].values("ARG") if v.startswith("TORCH_INDEX_URL=")]
    assert args == ["TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"]


def test_copy_sources_exist_in_the_repository() -> None:
    stage_names = list(STAGES)
    missing, unknown_stages = [], []
    for index, stage in enumerate(STAGES.values()):
        for source_stage, source in copy_sources(stage):
            if source_stage is None and not (REPO / source).exists():
                missing.append(source)
            elif source_stage is not None and source_stage not in stage_names[:index]:
                unknown_stages.append(source_stage)
    assert not missing, (
        f"COPY sources not in the repository (the build context): {sorted(set(missing))}"
    )
    assert not unknown_stages, f"COPY --from names no earlier stage: {unknown_stages}"


def test_dockerignore_sends_every_copy_source() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "allow-list: ignore everything, then re-include what COPY needs"
    included = {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
    sources = {
        src.rstrip("/")
        for stage in STAGES.values()
        for src_stage, src in copy_sources(stage)
        if src_stage is None
    }
    assert sources <= included, (
        f"COPY sources the build context would not contain: {sources - included}"
    )
    for pattern in patterns[patterns.index("*") + 1 :]:
        if not pattern.startswith("!"):
            assert pattern.startswith("**/"), f"{pattern} may exclude a COPY source"
