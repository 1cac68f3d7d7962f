"""The kustomize renderer (kustomize_lite) behaves as kustomize does, for what deploy/ uses."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import kustomize_lite
import pytest
import yaml
from deploy_helpers import BASE, OBSERVABILITY, OVERLAYS, run

KUSTOMIZATIONS = {"base": BASE, "observability": OBSERVABILITY, **OVERLAYS}


def write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


BASE_DEPLOYMENT = """\
    apiVersion: apps/v1
    kind: Deployment
    metadata: {name: x}
    spec:
      template:
        spec:
          containers:
            - name: a
              image: app
              env: [{name: A, value: "1"}, {name: B, value: "2"}, {name: C, value: "3"}]
            - name: b
              image: app:old
          volumes: [{name: v1, emptyDir: {}}, {name: v2, emptyDir: {}}, {name: v3, emptyDir: {}}]
    """


def test_strategic_merge_orders_lists_like_kustomize(tmp_path: Path) -> None:
    # Expected output taken from `kubectl kustomize` (kustomize v5.5) on the same files.
    write(
        tmp_path,
        {
            "base/kustomization.yaml": "resources: [d.yaml]\n",
            "base/d.yaml": BASE_DEPLOYMENT,
            "overlay/kustomization.yaml": "resources: [../base]\npatches: [{path: p.yaml}]\n",
            "overlay/p.yaml": """\
                apiVersion: apps/v1
                kind: Deployment
                metadata: {name: x}
                spec:
                  template:
                    spec:
                      containers:
                        - name: b
                          env: [{name: Z, value: "9"}]
                        - name: a
                          env: [{name: C, value: "33"}, {name: D, value: "4"}]
                      volumes: [{name: v3, emptyDir: {medium: Memory}}, {name: v4, emptyDir: {}}]
                """,
        },
    )
    [deployment] = kustomize_lite.render(tmp_path / "overlay")
    spec = deployment["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["containers"]] == ["b", "a"]
    assert spec["containers"][1]["env"] == [
        {"name": "C", "value": "33"},
        {"name": "D", "value": "4"},
        {"name": "A", "value": "1"},
        {"name": "B", "value": "2"},
    ]
    assert spec["containers"][0] == {
        "name": "b",
        "image": "app:old",
        "env": [{"name": "Z", "value": "9"}],
    }
    assert [v["name"] for v in spec["volumes"]] == ["v3", "v4", "v1", "v2"]
    assert spec["volumes"][0]["emptyDir"] == {"medium": "Memory"}


def test_null_in_a_patch_deletes_the_field(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "kustomization.yaml": "resources: [d.yaml]\npatches: [{path: p.yaml}]\n",
            "d.yaml": BASE_DEPLOYMENT,
            "p.yaml": """\
                apiVersion: apps/v1
                kind: Deployment
                metadata: {name: x}
                spec:
                  template:
                    spec:
                      volumes: [{name: v1, emptyDir: null, persistentVolumeClaim: {claimName: c}}]
                """,
        },
    )
    [deployment] = kustomize_lite.render(tmp_path)
    assert deployment["spec"]["template"]["spec"]["volumes"][0] == {
        "name": "v1",
        "persistentVolumeClaim": {"claimName": "c"},
    }


def test_generator_hash_matches_kustomize() -> None:
    # Names from `kubectl kustomize` (v5.5) for literals x=1: ConfigMap a-hmg6f82fh6, Secret
    # s-bf2648c599. The hash does not depend on the name (kustomize v5 hashes it as "").
    config_map = {"kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"x": "1"}}
    secret = {"kind": "Secret", "metadata": {"name": "s"}, "type": "Opaque", "data": {"x": "MQ=="}}
    assert kustomize_lite.generator_hash(config_map) == "hmg6f82fh6"
    assert kustomize_lite.generator_hash(secret) == "bf2648c599"


def test_generated_names_are_hashed_and_references_follow(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "kustomization.yaml": """\
                resources: [d.yaml]
                namespace: ns
                images: [{name: app, newName: registry.example/app, newTag: v2}]
                configMapGenerator: [{name: cfg, files: [conf.yaml]}]
                secretGenerator: [{name: tok, files: [tokens=tokens.txt]}]
                """,
            "conf.yaml": "a: 1\n",
            "tokens.txt": "client:x\n",
            "d.yaml": """\
                apiVersion: apps/v1
                kind: Deployment
                metadata: {name: x}
                spec:
                  template:
                    spec:
                      containers: [{name: a, image: app}]
                      volumes:
                        - {name: c, configMap: {name: cfg}}
                        - {name: t, secret: {secretName: tok}}
                """,
        },
    )
    config_map, secret, deployment = kustomize_lite.render(tmp_path)
    assert config_map["metadata"]["name"].startswith("cfg-")
    assert config_map["data"] == {"conf.yaml": "a: 1\n"}
    assert secret["metadata"]["name"].startswith("tok-")
    assert secret["data"] == {"tokens": "Y2xpZW50OngK"}
    spec = deployment["spec"]["template"]["spec"]
    assert spec["volumes"][0]["configMap"]["name"] == config_map["metadata"]["name"]
    assert spec["volumes"][1]["secret"]["secretName"] == secret["metadata"]["name"]
    assert spec["containers"][0]["image"] == "registry.example/app:v2"
    assert {m["metadata"]["namespace"] for m in (config_map, secret, deployment)} == {"ns"}


def test_unsupported_features_are_refused(tmp_path: Path) -> None:
    write(tmp_path, {"kustomization.yaml": "resources: []\nnamePrefix: x-\n"})
    with pytest.raises(kustomize_lite.UnsupportedFeature, match="namePrefix"):
        kustomize_lite.render(tmp_path)


def test_patch_must_match_one_resource(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "kustomization.yaml": "resources: [d.yaml]\npatches: [{path: p.yaml}]\n",
            "d.yaml": BASE_DEPLOYMENT,
            "p.yaml": "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: y}\nspec: {}\n",
        },
    )
    with pytest.raises(ValueError, match="matches 0 resources"):
        kustomize_lite.render(tmp_path)


def _real_kustomize() -> list[str] | None:
    """Return a command running kustomize v4+ (`CMD DIR` renders DIR), if one is installed."""
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        result = run("kubectl", "version", "--client", "-o", "json")
        if result.returncode == 0:
            version = json.loads(result.stdout).get("kustomizeVersion", "")
            if (
                version.startswith("v")
                and version[1:].split(".")[0].isdigit()
                and int(version[1:].split(".")[0]) >= 4
            ):
                return ["kubectl", "kustomize"]
    return None


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_renderer_agrees_with_real_kustomize(name: str) -> None:
    command = _real_kustomize()
    if command is None:
        pytest.skip("no kustomize v4+ (kustomize or kubectl) installed to compare with")
    result = run(*command, KUSTOMIZATIONS[name])
    assert result.returncode == 0, result.stderr
    theirs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert kustomize_lite.render(KUSTOMIZATIONS[name]) == theirs
