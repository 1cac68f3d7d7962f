"""Render the kustomizations under deploy/ without a kustomize binary.

Debian's kubectl (1.20, kustomize v2) predates the `patches` field and no newer kustomize comes
from a package registry, so tests/deploy render with this instead. It covers exactly the
kustomize features deploy/ uses and raises `UnsupportedFeature` on anything else, so a new
feature in a kustomization fails the tests instead of being silently ignored:

- `resources`: YAML files (multi-document) and directories holding a kustomization.yaml;
- `namespace`: set on every namespaced resource;
- `images`: `newName` / `newTag` / `digest` for containers and init containers of pod templates;
- `configMapGenerator` / `secretGenerator`: `files` (`key=path` or `path`), `options.labels`,
  `options.disableNameSuffixHash`; the content-hash name suffix is kustomize's, and references
  to the generated names in pod templates are updated;
- `patches`: strategic-merge patch files (`path:`), targeting the resource with the patch's kind
  and name; lists merge by key for the fields in `_MERGE_KEYS`, replace for `_REPLACE_LISTS`,
  and a null value deletes a field.

tests/deploy/test_deploy_kustomize.py compares this renderer with `kubectl kustomize` wherever a
kubectl with kustomize v4 or later is installed.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

Manifest = dict[str, Any]

_KUSTOMIZATION_FIELDS = {
    "apiVersion",
    "kind",
    "namespace",
    "resources",
    "images",
    "configMapGenerator",
    "secretGenerator",
    "patches",
}
_GENERATOR_FIELDS = {"name", "files", "options"}
_GENERATOR_OPTIONS = {"labels", "disableNameSuffixHash"}

# Kinds that live outside namespaces, among those deploy/ could plausibly use.
_CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "PriorityClass",
    "StorageClass",
}

# Strategic merge: list fields that merge element-wise by a key (as the Kubernetes API declares
# them), and list fields that a patch replaces whole. A list field in neither is refused.
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "env": "name",
}
_REPLACE_LISTS = {"args", "command", "tolerations", "policies", "metrics", "drop", "accessModes"}

# kustomize's default ("legacy") output order: these kinds first, in this order, then the rest.
_KIND_ORDER = [
    "Namespace",
    "ResourceQuota",
    "StorageClass",
    "CustomResourceDefinition",
    "ServiceAccount",
    "PodSecurityPolicy",
    "Role",
    "ClusterRole",
    "RoleBinding",
    "ClusterRoleBinding",
    "ConfigMap",
    "Secret",
    "Endpoints",
    "Service",
    "LimitRange",
    "PriorityClass",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "Deployment",
    "StatefulSet",
    "CronJob",
    "PodDisruptionBudget",
]


class UnsupportedFeature(ValueError):
    """The kustomization uses something this renderer does not implement."""


@dataclass(slots=True)
class _Resource:
    obj: Manifest  # the manifest, as it will be printed
    hash_suffix: bool = False  # generated, and its name gets kustomize's content-hash suffix


def render(directory: Path) -> list[Manifest]:
    """Render the kustomization in `directory` as `kubectl kustomize` would.

    Args:
        directory: a directory holding kustomization.yaml.

    Returns:
        The manifests, in kustomize's default order.

    Raises:
        UnsupportedFeature: the kustomization uses a feature this module does not cover.
        FileNotFoundError: a resource, generator file or patch does not exist.
        ValueError: a patch matches no resource, or more than one.
    """
    resources = _build(Path(directory).resolve())
    renames: dict[tuple[str, str], str] = {}
    for res in resources:
        if res.hash_suffix:
            meta = res.obj["metadata"]
            new_name = f"{meta['name']}-{generator_hash(res.obj)}"
            renames[(res.obj["kind"], meta["name"])] = new_name
            meta["name"] = new_name
    objs = [res.obj for res in resources]
    for obj in objs:
        _rename_references(obj, renames)
    return sorted(objs, key=_order_key)


def to_yaml(manifests: list[Manifest]) -> str:
    """Return `manifests` as one multi-document YAML stream."""
    return yaml.safe_dump_all(manifests, sort_keys=True, default_flow_style=False)


def generator_hash(obj: Manifest) -> str:
    """Return kustomize's 10-character content hash of a generated ConfigMap or Secret.

    kustomize hashes the JSON (sorted keys, Go's HTML escaping) of the kind, name and data
    (and type, for a Secret), takes the first 10 hex digits of its SHA-256, and swaps the
    digits and letters that could spell words for others. kustomize v5 hashes an empty name
    (its hasher looks up `metadata/name` as one field and finds nothing), and so does this.
    """
    fields: dict[str, Any] = {"kind": obj["kind"], "name": ""}
    fields["data"] = obj.get("data", {})
    if obj["kind"] == "Secret":
        fields["type"] = obj.get("type", "Opaque")
    elif obj.get("binaryData"):
        fields["binaryData"] = obj["binaryData"]
    encoded = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for raw, escaped in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e")):
        encoded = encoded.replace(raw, escaped)
    encoded = encoded.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    digest = hashlib.sha256(encoded.encode("utf-8")).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def _build(root: Path) -> list[_Resource]:
    spec = yaml.safe_load((root / "kustomization.yaml").read_text(encoding="utf-8")) or {}
    unknown = set(spec) - _KUSTOMIZATION_FIELDS
    if unknown:
        raise UnsupportedFeature(f"{root}/kustomization.yaml: unsupported fields {sorted(unknown)}")

    resources: list[_Resource] = []
    for entry in spec.get("resources", []):
        path = (root / entry).resolve()
        if path.is_dir():
            resources.extend(_build(path))
        else:
            text = path.read_text(encoding="utf-8")
            resources.extend(_Resource(doc) for doc in yaml.safe_load_all(text) if doc)
    for gen in spec.get("configMapGenerator", []):
        resources.append(_generate(root, "ConfigMap", gen))
    for gen in spec.get("secretGenerator", []):
        resources.append(_generate(root, "Secret", gen))

    for patch in spec.get("patches", []):
        if set(patch) != {"path"}:
            raise UnsupportedFeature(
                f"{root}: only `patches: [{{path: ...}}]` is supported, got {patch}"
            )
        _apply_patch(resources, yaml.safe_load((root / patch["path"]).read_text(encoding="utf-8")))
    if "namespace" in spec:
        for res in resources:
            if res.obj["kind"] not in _CLUSTER_SCOPED:
                res.obj["metadata"]["namespace"] = spec["namespace"]
    for image in spec.get("images", []):
        for res in resources:
            _set_image(res.obj, image)
    return resources


def _generate(root: Path, kind: str, gen: dict[str, Any]) -> _Resource:
    unknown = (set(gen) - _GENERATOR_FIELDS) | (set(gen.get("options", {})) - _GENERATOR_OPTIONS)
    if unknown:
        raise UnsupportedFeature(f"{root}: unsupported generator fields {sorted(unknown)}")
    data: dict[str, str] = {}
    for entry in gen.get("files", []):
        key, _, rel = entry.rpartition("=")
        path = root / rel
        content = path.read_text(encoding="utf-8")
        data[key or path.name] = content
    options = gen.get("options", {})
    meta: dict[str, Any] = {"name": gen["name"]}
    if options.get("labels"):
        meta["labels"] = dict(options["labels"])
    obj: Manifest = {"apiVersion": "v1", "kind": kind, "metadata": meta}
    if kind == "Secret":
        obj["type"] = "Opaque"
        obj["data"] = {k: _base64_folded(v) for k, v in data.items()}
    else:
        obj["data"] = data
    return _Resource(obj, hash_suffix=not options.get("disableNameSuffixHash", False))


def _base64_folded(text: str) -> str:
    # kustomize folds base64 longer than 70 characters into 70-character lines, each ending
    # in a newline (the API server's decoder skips them); the hash covers the folded form.
    encoded = base64.b64encode(text.encode("utf-8")).decode("ascii")
    if len(encoded) <= 70:
        return encoded
    return "".join(encoded[i : i + 70] + "\n" for i in range(0, len(encoded), 70))


def _apply_patch(resources: list[_Resource], patch: Manifest) -> None:
    kind, name = patch["kind"], patch["metadata"]["name"]
    targets = [r for r in resources if r.obj["kind"] == kind and r.obj["metadata"]["name"] == name]
    if len(targets) != 1:
        raise ValueError(f"patch for {kind}/{name} matches {len(targets)} resources, not 1")
    targets[0].obj = _merge(targets[0].obj, patch, path=f"{kind}/{name}")


def _merge(base: Any, patch: Any, path: str) -> Any:
    if not (isinstance(base, dict) and isinstance(patch, dict)):
        return copy.deepcopy(patch)
    out = dict(base)
    for key, value in patch.items():
        where = f"{path}.{key}"
        if key.startswith("$"):
            raise UnsupportedFeature(f"{where}: strategic-merge directives are not supported")
        if value is None:
            out.pop(key, None)
        elif isinstance(value, list):
            if key in _MERGE_KEYS:
                out[key] = _merge_list(out.get(key, []), value, _MERGE_KEYS[key], where)
            elif key in _REPLACE_LISTS:
                out[key] = copy.deepcopy(value)
            else:
                raise UnsupportedFeature(
                    f"{where}: list field {key!r} is neither merged nor replaced here"
                )
        elif key in out:
            out[key] = _merge(out[key], value, where)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _merge_list(base: list[Any], patch: list[Any], merge_key: str, path: str) -> list[Any]:
    # As kustomize orders them: the patch's elements first, in its order (merged into the base
    # element with the same key, if any), then the base elements it did not mention.
    by_key = {item[merge_key]: item for item in base}
    out = [
        _merge(by_key.get(item[merge_key], {}), item, f"{path}[{item[merge_key]}]")
        for item in patch
    ]
    mentioned = {item[merge_key] for item in patch}
    out.extend(copy.deepcopy(item) for item in base if item[merge_key] not in mentioned)
    return out


def _pod_specs(obj: Manifest) -> list[Manifest]:
    if obj["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
        return [obj["spec"]["template"]["spec"]]
    if obj["kind"] == "CronJob":
        return [obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]]
    return []


def _containers(pod_spec: Manifest) -> list[Manifest]:
    return list(pod_spec.get("initContainers", [])) + list(pod_spec.get("containers", []))


def _set_image(obj: Manifest, image: dict[str, str]) -> None:
    for pod_spec in _pod_specs(obj):
        for container in _containers(pod_spec):
            name, tag, digest = _split_image(container["image"])
            if name != image["name"]:
                continue
            name = image.get("newName", name)
            if "digest" in image:
                tag, digest = "", image["digest"]
            elif "newTag" in image:
                tag, digest = image["newTag"], ""
            container["image"] = (
                name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
            )


def _split_image(ref: str) -> tuple[str, str, str]:
    name, _, digest = ref.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1 :], digest
    return name, "", digest


def _rename_references(obj: Manifest, renames: dict[tuple[str, str], str]) -> None:
    def fix(ref: dict[str, Any] | None, kind: str, field: str) -> None:
        if ref and (kind, ref.get(field)) in renames:
            ref[field] = renames[(kind, ref[field])]

    for pod_spec in _pod_specs(obj):
        for volume in pod_spec.get("volumes", []):
            fix(volume.get("configMap"), "ConfigMap", "name")
            fix(volume.get("secret"), "Secret", "secretName")
            for source in volume.get("projected", {}).get("sources", []):
                fix(source.get("configMap"), "ConfigMap", "name")
                fix(source.get("secret"), "Secret", "name")
        for container in _containers(pod_spec):
            for env in container.get("env", []):
                value_from = env.get("valueFrom", {})
                fix(value_from.get("configMapKeyRef"), "ConfigMap", "name")
                fix(value_from.get("secretKeyRef"), "Secret", "name")
            for env_from in container.get("envFrom", []):
                fix(env_from.get("configMapRef"), "ConfigMap", "name")
                fix(env_from.get("secretRef"), "Secret", "name")


def _order_key(obj: Manifest) -> tuple[int, str, str, str]:
    kind = obj["kind"]
    rank = _KIND_ORDER.index(kind) - len(_KIND_ORDER) if kind in _KIND_ORDER else 0
    group_version = obj["apiVersion"]
    meta = obj["metadata"]
    return rank, f"{group_version}/{kind}", meta.get("namespace", ""), meta["name"]
