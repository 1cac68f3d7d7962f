"""The rendered Kubernetes manifests: valid, and consistent with the server and each other."""

from __future__ import annotations

import hashlib
import os
import shlex
from pathlib import Path, PurePosixPath
from typing import Any

import crd_schemas
import jsonschema
import kubernetes_validate
import pytest
import yaml
from deploy_contract import (
    APP_UID,
    GRPC_PORT,
    HEALTH_SERVICES,
    HPA_METRIC,
    HTTP_PORT,
    METRICS_PORT,
    SERVE_SETTINGS,
    SERVICE_NAME,
    SETTING_CHOICES,
)
from deploy_helpers import BASE, DEPLOY, OBSERVABILITY, OVERLAYS, Manifest, find, kustomize, one

# Oldest Kubernetes the manifests support: the preStop `sleep` action is on by default from
# 1.30. Newest: the latest schemas kubernetes-validate bundles.
K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]

# Margin between (preStop sleep + drain_timeout_s) and terminationGracePeriodSeconds, for the
# process to stop its servers and exit after the drain.
EXIT_MARGIN_S = 10

OVERLAY_NAMES = sorted(OVERLAYS)


# -- helpers ----------------------------------------------------------------------------------


def deployment(manifests: list[Manifest]) -> Manifest:
    return one(manifests, "Deployment", "imagegen")


def pod_spec(manifests: list[Manifest]) -> dict[str, Any]:
    return deployment(manifests)["spec"]["template"]["spec"]


def server(manifests: list[Manifest]) -> dict[str, Any]:
    [container] = [c for c in pod_spec(manifests)["containers"] if c["name"] == "server"]
    return container


def server_config(manifests: list[Manifest]) -> dict[str, Any]:
    """The server's YAML settings, as the pod reads them through --config."""
    path = PurePosixPath(config_path(manifests))
    volume = volume_at(manifests, str(path.parent))
    config_map = one(manifests, "ConfigMap", volume["configMap"]["name"])
    return yaml.safe_load(config_map["data"][path.name])


def config_path(manifests: list[Manifest]) -> str:
    args = server(manifests)["args"]
    assert args[0] == "serve", args
    return args[args.index("--config") + 1]


def volume_at(manifests: list[Manifest], mount_path: str) -> dict[str, Any]:
    """Return the pod volume that the server container mounts at `mount_path`."""
    [mount] = [m for m in server(manifests)["volumeMounts"] if m["mountPath"] == mount_path]
    [volume] = [v for v in pod_spec(manifests)["volumes"] if v["name"] == mount["name"]]
    return volume


def env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def pre_stop_sleep_s(container: dict[str, Any]) -> int:
    pre_stop = container.get("lifecycle", {}).get("preStop")
    if pre_stop is None:
        return 0
    if "sleep" in pre_stop:
        return int(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep", f"unexpected preStop {pre_stop}"
    return int(command[1])


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def workload_pod_specs(manifests: list[Manifest]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{m['kind']}/{m['metadata']['name']}", m["spec"]["template"]["spec"])
        for m in manifests
        if m["kind"] in {"Deployment", "Job"}
    ]


# -- schemas ----------------------------------------------------------------------------------


CRD_SCHEMAS = crd_schemas.crd_schemas()


def validate(manifest: Manifest, version: str) -> None:
    """Validate against the Kubernetes schemas, or the Prometheus Operator's CRDs."""
    crd = CRD_SCHEMAS.get((manifest["apiVersion"], manifest["kind"]))
    if crd is not None:
        # Path and message only: a jsonschema error prints the whole (large) CRD schema.
        errors = jsonschema.Draft4Validator(crd).iter_errors(manifest)
        found = sorted(f"{e.json_path}: {e.message}" for e in errors)
        assert not found, f"{manifest['kind']}/{manifest['metadata']['name']}: {found}"
    else:
        kubernetes_validate.validate(manifest, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_overlay_matches_kubernetes_schemas(
    rendered: dict[str, list[Manifest]], overlay: str, version: str
) -> None:
    for manifest in rendered[overlay]:
        validate(manifest, version)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_observability_and_jobs_match_schemas(
    rendered_observability: list[Manifest], standalone: list[Manifest], version: str
) -> None:
    for manifest in rendered_observability + standalone:
        validate(manifest, version)


def test_vendored_crds_are_the_ones_deploy_uses(
    rendered: dict[str, list[Manifest]], rendered_observability: list[Manifest]
) -> None:
    manifests = [m for ms in rendered.values() for m in ms] + rendered_observability
    used = {(m["apiVersion"], m["kind"]) for m in manifests}
    assert used >= set(CRD_SCHEMAS), "tests/deploy/schemas holds a CRD that deploy/ does not use"


def test_vendored_crds_are_unchanged() -> None:
    # The checksums that tests/deploy/schemas/README.md records for the release it names.
    readme = (crd_schemas.SCHEMAS_DIR / "README.md").read_text()
    for path in crd_schemas.SCHEMAS_DIR.glob("*.yaml"):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert f"| `{path.name}` | `{digest}` |" in readme, path.name


@pytest.mark.parametrize(
    ("endpoint", "error"),
    [
        ({"port": "metrics", "intervall": "15s"}, "'intervall' was unexpected"),  # misspelt
        ({"port": "metrics", "interval": "15 seconds"}, "does not match"),  # not a duration
        ({"port": "metrics", "scheme": "ftp"}, "is not one of"),  # not in the enum
    ],
)
def test_crd_schemas_reject_broken_monitors(
    rendered: dict[str, list[Manifest]], endpoint: dict[str, str], error: str
) -> None:
    monitor = one(rendered["gpu"], "ServiceMonitor")
    broken = {**monitor, "spec": {**monitor["spec"], "endpoints": [endpoint]}}
    with pytest.raises(AssertionError, match=error):
        validate(broken, K8S_VERSIONS[0])


def test_crd_schemas_reject_a_misplaced_rule_field(rendered_observability: list[Manifest]) -> None:
    rule = yaml.safe_load(yaml.safe_dump(one(rendered_observability, "PrometheusRule")))
    rule["spec"]["groups"][0]["rules"][0]["severity"] = "critical"  # belongs under labels
    with pytest.raises(AssertionError, match="'severity' was unexpected"):
        validate(rule, K8S_VERSIONS[0])


def test_strict_validation_rejects_unknown_fields(rendered: dict[str, list[Manifest]]) -> None:
    broken = yaml.safe_load(yaml.safe_dump(deployment(rendered["gpu"])))
    broken["spec"]["template"]["spec"]["containers"][0]["startupprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken, K8S_VERSIONS[0])


@pytest.mark.parametrize(
    "directory",
    sorted(path.parent for path in DEPLOY.rglob("kustomization.yaml")),
    ids=lambda path: str(path.relative_to(DEPLOY)),
)
def test_every_kustomization_renders(directory: Path) -> None:
    # The fixtures render the overlays and observability; this also covers the base alone
    # (others' overlays build on it) and any kustomization added later.
    assert kustomize(directory)


# -- probes, ports, drain -------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_probes_use_grpc_health_on_the_grpc_port(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    container = server(rendered[overlay])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": GRPC_PORT, "http": HTTP_PORT, "metrics": METRICS_PORT}
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[probe_name]
        assert set(probe) - {
            "periodSeconds",
            "timeoutSeconds",
            "failureThreshold",
            "successThreshold",
        } == {"grpc"}
        assert probe["grpc"]["port"] == GRPC_PORT, probe_name
        assert probe["grpc"].get("service", "") in HEALTH_SERVICES, probe_name
    # Readiness follows the ImageGeneration service: it turns NOT_SERVING when the drain starts.
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert container["startupProbe"]["grpc"]["service"] == SERVICE_NAME


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_config_matches_the_pod(rendered: dict[str, list[Manifest]], overlay: str) -> None:
    manifests = rendered[overlay]
    config = server_config(manifests)
    assert set(config) <= SERVE_SETTINGS, f"unknown settings {set(config) - SERVE_SETTINGS}"
    for key, choices in SETTING_CHOICES.items():
        if key in config:
            assert config[key] in choices, key
    assert config.get("port", GRPC_PORT) == GRPC_PORT
    assert config.get("metrics_port", METRICS_PORT) == METRICS_PORT
    # A container must listen on all interfaces, or nothing outside the pod reaches it.
    assert config["host"] == "0.0.0.0"
    assert config["metrics_host"] == "0.0.0.0"
    # The token file is the Secret's `tokens` key, mounted where the config says.
    tokens = PurePosixPath(config["auth_tokens_file"])
    secret = one(
        manifests, "Secret", volume_at(manifests, str(tokens.parent))["secret"]["secretName"]
    )
    assert tokens.name in secret["data"]
    # The model lives on the models volume, read-only for the server.
    models_mount = next(m for m in server(manifests)["volumeMounts"] if m["name"] == "models")
    assert PurePosixPath(config["model"]).is_relative_to(models_mount["mountPath"])
    assert models_mount["readOnly"] is True


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_server_accepts_the_config(
    rendered: dict[str, list[Manifest]],
    overlay: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The server's own settings class (pydantic, unknown keys forbidden), as `serve --config`
    # loads the file; it imports without torch.
    from imagegen_server.base.config import load_settings

    for name in [n for n in os.environ if n.startswith("IMAGEGEN_")]:
        monkeypatch.delenv(name)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(server_config(rendered[overlay])))
    settings = load_settings(config=str(path))
    assert settings.port == GRPC_PORT and settings.metrics_port == METRICS_PORT


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_grace_period_covers_prestop_and_drain(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    manifests = rendered[overlay]
    drain_s = server_config(manifests)["drain_timeout_s"]
    pre_stop_s = pre_stop_sleep_s(server(manifests))
    grace_s = pod_spec(manifests)["terminationGracePeriodSeconds"]
    assert grace_s >= pre_stop_s + drain_s + EXIT_MARGIN_S, (
        f"terminationGracePeriodSeconds {grace_s} < preStop {pre_stop_s}"
        f" + drain_timeout_s {drain_s} + {EXIT_MARGIN_S} s to exit"
    )


def test_gpu_startup_probe_allows_a_long_model_load(rendered: dict[str, list[Manifest]]) -> None:
    probe = server(rendered["gpu"])["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 20 * 60


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_rollout_deadline_outlasts_startup(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    # A rollout is reported stalled after progressDeadlineSeconds without a new ready pod.
    probe = server(rendered[overlay])["startupProbe"]
    deadline_s = deployment(rendered[overlay])["spec"].get("progressDeadlineSeconds", 600)
    assert deadline_s > probe["periodSeconds"] * probe["failureThreshold"]


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_readiness_drops_a_draining_pod_quickly(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    probe = server(rendered[overlay])["readinessProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] <= 10


# -- security and writable paths --------------------------------------------------------------


@pytest.mark.parametrize("overlay", [*OVERLAY_NAMES, "jobs"])
def test_pods_are_locked_down(
    rendered: dict[str, list[Manifest]], standalone: list[Manifest], overlay: str
) -> None:
    manifests = standalone if overlay == "jobs" else rendered[overlay]
    for where, spec in workload_pod_specs(manifests):
        assert spec["automountServiceAccountToken"] is False, where
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] is True, where
        assert pod_security["runAsUser"] == APP_UID, where
        assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert not any(k.startswith("host") for k in spec), where
        for container in all_containers(spec):
            ctx = container["securityContext"]
            name = f"{where} {container['name']}"
            assert ctx["allowPrivilegeEscalation"] is False, name
            assert ctx["readOnlyRootFilesystem"] is True, name
            assert ctx["runAsNonRoot"] is True, name
            assert ctx["capabilities"] == {"drop": ["ALL"]}, name
            assert ctx.get("privileged", False) is False, name
            for key in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][key]), name


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_server_writes_only_to_tmp_and_hf_home(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    manifests = rendered[overlay]
    container = server(manifests)
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly", False)}
    assert writable == {"/tmp", "/cache"}
    for path in writable:
        assert "emptyDir" in volume_at(manifests, path), path
    variables = env(container)
    assert PurePosixPath(variables["HF_HOME"]).is_relative_to("/cache")
    assert variables["HF_HUB_OFFLINE"] == "1"
    assert variables["PYTHONDONTWRITEBYTECODE"] == "1"


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_namespace_enforces_restricted_pod_security(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    manifests = rendered[overlay]
    namespace = one(manifests, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    name = namespace["metadata"]["name"]
    assert {m["metadata"].get("namespace") for m in manifests if m["kind"] != "Namespace"} == {name}


def test_example_tokens_are_marked_as_placeholders(rendered: dict[str, list[Manifest]]) -> None:
    lines = (BASE / "auth-tokens.example").read_text().splitlines()
    entries = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    assert entries
    for line in entries:
        role, _, token = line.partition(":")
        assert role in {"client", "admin"}, line
        assert token.startswith("REPLACE-ME"), "example tokens must say they are placeholders"


# -- variants --------------------------------------------------------------------------------


def test_gpu_overlay_gets_one_gpu_on_gpu_nodes(rendered: dict[str, list[Manifest]]) -> None:
    manifests = rendered["gpu"]
    spec = pod_spec(manifests)
    resources = server(manifests)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["requests"]["nvidia.com/gpu"] == 1
    assert "memory" in resources["limits"]
    assert spec["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    models = volume_at(manifests, "/models")
    claim = models["persistentVolumeClaim"]
    assert set(models) == {"name", "persistentVolumeClaim"} and claim["readOnly"] is True
    one(manifests, "PersistentVolumeClaim", claim["claimName"])
    assert server_config(manifests)["device"] == "cuda"


def test_cpu_overlay_writes_the_tiny_model_where_the_server_reads_it(
    rendered: dict[str, list[Manifest]],
) -> None:
    manifests = rendered["cpu-tiny"]
    spec = pod_spec(manifests)
    assert "nvidia.com/gpu" not in server(manifests)["resources"]["limits"]
    [init] = spec["initContainers"]
    assert init["args"][:2] == ["tiny-model", server_config(manifests)["model"]]
    assert init["image"] == server(manifests)["image"]
    [mount] = [m for m in init["volumeMounts"] if m["name"] == "models"]
    assert not mount.get("readOnly", False)
    assert PurePosixPath(init["args"][1]).is_relative_to(mount["mountPath"])
    assert "emptyDir" in volume_at(manifests, "/models")
    assert server_config(manifests)["device"] == "cpu"


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_images_are_tagged(rendered: dict[str, list[Manifest]], overlay: str) -> None:
    for container in all_containers(pod_spec(rendered[overlay])):
        name, _, tag = container["image"].rpartition(":")
        assert name and tag and tag != "latest", container["image"]


# -- services, scraping, scaling --------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_services_reach_the_grpc_port(rendered: dict[str, list[Manifest]], overlay: str) -> None:
    manifests = rendered[overlay]
    pod_labels = deployment(manifests)["spec"]["template"]["metadata"]["labels"]
    named_ports = {p["name"]: p["containerPort"] for p in server(manifests)["ports"]}
    headless = one(manifests, "Service", "imagegen-headless")["spec"]
    cluster_ip = one(manifests, "Service", "imagegen")["spec"]
    assert headless["clusterIP"] == "None"
    assert not headless.get("publishNotReadyAddresses", False)
    assert cluster_ip.get("type", "ClusterIP") == "ClusterIP" and "clusterIP" not in cluster_ip
    for spec in (headless, cluster_ip):
        assert selects(spec["selector"], pod_labels)
        ports = {p["name"]: p for p in spec["ports"]}
        assert ports["grpc"]["port"] == GRPC_PORT
        for port in ports.values():
            assert named_ports[port["targetPort"]] == port["port"]
    assert {p["name"] for p in cluster_ip["ports"]} == {"grpc", "http", "metrics"}


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_service_monitor_scrapes_each_pod_once(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    manifests = rendered[overlay]
    monitor = one(manifests, "ServiceMonitor")["spec"]
    services = [
        s
        for s in find(manifests, "Service")
        if selects(monitor["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert services
    for endpoint in monitor["endpoints"]:
        with_port = [
            s for s in services if any(p["name"] == endpoint["port"] for p in s["spec"]["ports"])
        ]
        assert len(with_port) == 1, (
            f"port {endpoint['port']} is on {len(with_port)} selected Services"
        )
        # The alert rules select job="imagegen": the operator names the job after the Service.
        assert with_port[0]["metadata"]["name"] == "imagegen"
        assert endpoint["path"] == "/metrics"


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_autoscaler_scales_the_deployment_on_pending_requests(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    manifests = rendered[overlay]
    hpa = one(manifests, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "imagegen",
    }
    [metric] = hpa["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == HPA_METRIC
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    # The HPA owns the replica count.
    assert "replicas" not in deployment(manifests)["spec"]


def test_prometheus_adapter_serves_the_hpa_metric() -> None:
    rules = yaml.safe_load((OBSERVABILITY / "prometheus-adapter-rules.yaml").read_text())["rules"]
    [rule] = [r for r in rules if r["name"]["as"] == HPA_METRIC]
    assert rule["seriesQuery"].startswith(HPA_METRIC + "{")
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
    for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert placeholder in rule["metricsQuery"]


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_disruption_budget_and_network_policy_cover_the_pods(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    manifests = rendered[overlay]
    pod_labels = deployment(manifests)["spec"]["template"]["metadata"]["labels"]
    pdb = one(manifests, "PodDisruptionBudget")["spec"]
    assert selects(pdb["selector"]["matchLabels"], pod_labels)
    assert pdb["maxUnavailable"] == 1
    policy = one(manifests, "NetworkPolicy")["spec"]
    assert selects(policy["podSelector"]["matchLabels"], pod_labels)
    allowed = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
    service_ports = {
        p["targetPort"] for s in find(manifests, "Service") for p in s["spec"]["ports"]
    }
    assert service_ports <= allowed


def test_job_downloads_into_the_models_claim(
    rendered: dict[str, list[Manifest]], standalone: list[Manifest]
) -> None:
    job = one(standalone, "Job")
    spec = job["spec"]["template"]["spec"]
    [container] = spec["containers"]
    local_dir = container["command"][container["command"].index("--local-dir") + 1]
    assert local_dir == server_config(rendered["gpu"])["model"]
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in spec["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {one(rendered["gpu"], "PersistentVolumeClaim")["metadata"]["name"]}
    assert job["metadata"]["namespace"] == one(rendered["gpu"], "Namespace")["metadata"]["name"]
    assert shlex.join(container["command"]).startswith("hf download ")
