"""The Kubernetes probes ask a real server, started from the manifests' own configuration, for
health service names it actually serves, on the port it actually listens on."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .conftest import launch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests/deploy"))
from deploy_helpers import kustomize  # noqa: E402


def rendered_server(overlay: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The server container of the overlay's Deployment and the config file it is given."""
    manifests = kustomize(REPO / "deploy/k8s/overlays" / overlay)
    deployment = next(m for m in manifests if m["kind"] == "Deployment")
    container = next(
        c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "server"
    )
    config_map = next(
        m for m in manifests if m["kind"] == "ConfigMap" and "config.yaml" in m.get("data", {})
    )
    return container, yaml.safe_load(config_map["data"]["config.yaml"])


def test_probes_reach_the_server_the_manifests_configure(tiny_model: Path, tmp_path: Path) -> None:
    container, config = rendered_server("cpu-tiny")
    probes = {
        name: container[name]["grpc"]
        for name in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    assert {probe["port"] for probe in probes.values()} == {grpc_port} == {config["port"]}

    # The cluster's paths and Secret are replaced by local ones; every other setting is the
    # manifest's. The port is taken as 0 (a free one): equal to the probes' port, checked above.
    tokens = tmp_path / "tokens"
    tokens.write_text("client:a-test-client-token-0123\n")
    local = {
        **config,
        "model": str(tiny_model),
        "adapter_dir": str(tiny_model / "adapters"),
        "auth_tokens_file": str(tokens),
        "host": "127.0.0.1",
        "metrics_host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "min_width": 32,
        "min_height": 32,
        "default_width": 64,
        "default_height": 64,
    }
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(local))
    server = launch(tiny_model, "--config", str(config_file))
    try:
        server.wait_serving()
        with grpc.insecure_channel(server.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name, probe in probes.items():  # kubelet probes carry no token
                status = health.Check(
                    health_pb2.HealthCheckRequest(service=probe.get("service", "")), timeout=10
                )
                assert status.status == health_pb2.HealthCheckResponse.SERVING, name
    finally:
        server.process.terminate()
        assert server.process.wait(60) == 0
