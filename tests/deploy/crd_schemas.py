"""JSON schemas for the custom resources in deploy/, from the Prometheus Operator's own CRDs.

The CRDs are vendored unchanged in tests/deploy/schemas (version and origin in its README).
A CRD's `openAPIV3Schema` lists the known fields without closing the objects: the API server
itself reports unknown fields, and `kubectl apply` (strict field validation, its default)
refuses them. `crd_schemas` closes every object that lists its properties and keeps no
unknown fields (`additionalProperties: false`), so a misspelt or misplaced field fails here
as it would at apply time. The CEL rules (`x-kubernetes-validations`) are not evaluated.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SCHEMAS_DIR = Path(__file__).resolve().parent / "schemas"

Schema = dict[str, Any]


def crd_schemas(directory: Path = SCHEMAS_DIR) -> dict[tuple[str, str], Schema]:
    """Return the closed schema of each served version of each CRD in `directory`.

    Returns:
        {(apiVersion, kind): JSON schema (OpenAPI v3.0, validate as Draft 4)}.
    """
    schemas = {}
    for path in sorted(directory.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text(encoding="utf-8"))
        spec = crd["spec"]
        for version in spec["versions"]:
            if version["served"]:
                api_version = f"{spec['group']}/{version['name']}"
                schema = _closed(version["schema"]["openAPIV3Schema"])
                schemas[(api_version, spec["names"]["kind"])] = schema
    return schemas


def _closed(schema: Schema) -> Schema:
    out = copy.deepcopy(schema)
    _close(out)
    return out


def _close(schema: Schema) -> None:
    keeps_unknown = schema.get("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in schema and "additionalProperties" not in schema and not keeps_unknown:
        schema["additionalProperties"] = False
    children = list(schema.get("properties", {}).values())
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            children.append(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        children.extend(schema.get(key, []))
    for child in children:
        _close(child)
