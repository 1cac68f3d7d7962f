"""Alert rules, Grafana dashboard and prometheus-adapter rule: valid PromQL over known metrics."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_contract import HPA_METRIC, LABEL_VALUES, METRICS, known_series
from deploy_helpers import OBSERVABILITY, Manifest, one, run
from promql_refs import label_matchers, matched_values, series_names

RULES = OBSERVABILITY / "alerts.rules.yaml"
RULE_TESTS = OBSERVABILITY / "alerts.test.yaml"
PROMETHEUS_RULE = OBSERVABILITY / "prometheusrule.yaml"
GENERATOR = OBSERVABILITY / "gen_prometheusrule.py"
DASHBOARD = OBSERVABILITY / "imagegen-dashboard.json"
ADAPTER_RULES = OBSERVABILITY / "prometheus-adapter-rules.yaml"


def alert_rules() -> list[dict[str, Any]]:
    return [
        rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
    ]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of the dashboard (panel targets and variable queries), with
    Grafana's interval variables replaced by a duration, as Grafana does before it queries."""
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            # label_values(SELECTOR, label) is Grafana's; the selector inside is PromQL.
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", variable["query"]["query"])
            assert match, variable["query"]
            exprs.append(match.group(1))
    return [re.sub(r"\$__\w+", "5m", expr) for expr in exprs]


def adapter_exprs() -> list[str]:
    """The adapter's queries with its template placeholders filled as the adapter would."""
    filled = {
        "<<.Series>>": HPA_METRIC,
        "<<.LabelMatchers>>": 'namespace="imagegen",pod=~"imagegen-a|imagegen-b"',
        "<<.GroupBy>>": "pod",
    }
    exprs = []
    for rule in yaml.safe_load(ADAPTER_RULES.read_text())["rules"]:
        query = rule["metricsQuery"]
        for placeholder, value in filled.items():
            query = query.replace(placeholder, value)
        exprs.extend([rule["seriesQuery"], query])
    return exprs


ALL_EXPRS = {
    "alert rules": [rule["expr"] for rule in alert_rules()],
    "dashboard": dashboard_exprs(),
    "prometheus-adapter rule": adapter_exprs(),
}


def test_contract_lists_exactly_the_server_metrics() -> None:
    # The server's own metric declarations (prometheus-client only, no torch).
    from imagegen_server.base.metrics import Metrics
    from prometheus_client import generate_latest

    exposition = generate_latest(Metrics().registry).decode()
    exported = {}
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            if not name.endswith("_created"):  # prometheus-client's creation timestamps
                exported[name] = kind
    assert exported == METRICS


# -- alert rules ------------------------------------------------------------------------------


def test_promtool_accepts_the_rules(promtool: Path) -> None:
    result = run(promtool, "check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_unit_tests_pass(promtool: Path) -> None:
    result = run(promtool, "test", "rules", RULE_TESTS.name, cwd=OBSERVABILITY)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert firing == {rule["alert"] for rule in alert_rules()}


def test_alerts_carry_severity_and_help() -> None:
    for rule in alert_rules():
        assert rule["alert"].startswith("Imagegen"), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert "for" in rule, f"{rule['alert']} fires on a single evaluation"


def test_prometheus_rule_is_generated_from_the_rules_file(
    rendered_observability: list[Manifest],
) -> None:
    result = run(sys.executable, GENERATOR, "--check")
    assert result.returncode == 0, result.stderr
    wrapped = one(rendered_observability, "PrometheusRule")
    assert wrapped["spec"] == yaml.safe_load(RULES.read_text())
    assert yaml.safe_load(PROMETHEUS_RULE.read_text())["spec"] == wrapped["spec"]


# -- dashboard --------------------------------------------------------------------------------


def test_dashboard_is_well_formed(rendered_observability: list[Manifest]) -> None:
    board = dashboard()
    assert board["uid"] and board["title"]
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
    # Shipped to Grafana's dashboard sidecar by deploy/observability, byte for byte.
    config_map = one(rendered_observability, "ConfigMap")
    assert config_map["metadata"]["labels"] == {"grafana_dashboard": "1"}
    assert config_map["data"] == {DASHBOARD.name: DASHBOARD.read_text()}


def test_dashboard_shows_what_operators_need() -> None:
    exprs = dashboard_exprs()

    def shown(pattern: str) -> bool:
        return any(re.search(pattern, expr) for expr in exprs)

    needed = {
        "throughput (images/s)": r"rate\(imagegen_images_generated_total",
        "latency p50": r"histogram_quantile\(0\.5, .*imagegen_request_latency_seconds_bucket",
        "latency p95": r"histogram_quantile\(0\.95, .*imagegen_request_latency_seconds_bucket",
        "latency p99": r"histogram_quantile\(0\.99, .*imagegen_request_latency_seconds_bucket",
        "queue depth": r"imagegen_pending_requests",
        "batch size": r"imagegen_batch_size_(bucket|sum)",
        "step time": r'imagegen_stage_seconds_bucket\{[^}]*stage="denoise_step"',
        "errors by status": r'sum by \(code\) \(rate\(imagegen_requests_total\{[^}]*code!="OK"',
        "ready replicas": r"imagegen_ready",
    }
    missing = [view for view, pattern in needed.items() if not shown(pattern)]
    assert not missing, f"dashboard lacks: {missing}"


# -- every PromQL expression ------------------------------------------------------------------


@pytest.mark.parametrize("source", sorted(ALL_EXPRS))
def test_promql_uses_only_known_metrics_and_label_values(source: str) -> None:
    known = known_series()
    for expr in ALL_EXPRS[source]:
        unknown = series_names(expr) - known
        assert not unknown, f"{source}: unknown series {unknown} in {expr}"
        for matcher in label_matchers(expr):
            if matcher.label in LABEL_VALUES:
                values = matched_values(matcher.operator, matcher.value)
                unused = set() if values is None else values - LABEL_VALUES[matcher.label]
                assert not unused, (
                    f"{source}: {matcher.label} {unused} never exported by the server: {expr}"
                )


def test_promql_parses(promtool: Path, tmp_path: Path) -> None:
    # promtool has no expression checker, but checks every rule's expr: wrap each in a
    # recording rule.
    rules = [
        {
            "record": f"check:{source.replace(' ', '_').replace('-', '_')}_{i}",
            "expr": expr,
        }
        for source, exprs in ALL_EXPRS.items()
        for i, expr in enumerate(exprs)
    ]
    path = tmp_path / "exprs.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "syntax", "rules": rules}]}))
    result = run(promtool, "check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr


# -- the PromQL reference extractor (promql-parser's AST) -------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (le) (rate(a{x="y"}[5m])) / on(pod) group_left b offset 5m', {"a", "b"}),
        ("deriv((sum by (ns) (c))[10m:1m]) > 0 and absent(d == 1)", {"c", "d"}),
        ('label_replace(e, "dst", "$1", "src", "(.*)") + {__name__="f"}', {"e", "f"}),
    ],
)
def test_series_names(expr: str, names: set[str]) -> None:
    assert series_names(expr) == names


def test_label_matchers() -> None:
    matchers = label_matchers('rate(x{code=~"OK|INTERNAL", rpc="Generate", pod=~"$pod"}[5m])')
    assert [(m.label, m.operator, m.value) for m in matchers] == [
        ("code", "=~", "OK|INTERNAL"),
        ("rpc", "=", "Generate"),
        ("pod", "=~", "$pod"),
    ]
    assert matched_values("=~", "OK|INTERNAL") == {"OK", "INTERNAL"}
    assert matched_values("=~", "5..") is None
    assert matched_values("=~", "$pod") is None


@pytest.mark.parametrize("expr", ["sum(rate(x[5m])", '{__name__=~"imagegen_.*"}'])
def test_unreadable_expressions_are_refused(expr: str) -> None:
    with pytest.raises(ValueError):
        series_names(expr)
