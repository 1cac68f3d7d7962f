"""Write prometheusrule.yaml, the Prometheus Operator wrapper of alerts.rules.yaml.

alerts.rules.yaml is the single source: this script indents its rule groups under
`spec:` of a PrometheusRule, keeping comments and block scalars as written.

Usage:
    python deploy/observability/gen_prometheusrule.py          # rewrite prometheusrule.yaml
    python deploy/observability/gen_prometheusrule.py --check  # exit 1 if it is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "alerts.rules.yaml"
TARGET = HERE / "prometheusrule.yaml"

HEADER = """\
# GENERATED from alerts.rules.yaml by gen_prometheusrule.py: edit the source, then run
#   python deploy/observability/gen_prometheusrule.py
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: imagegen
  labels:
    app.kubernetes.io/name: imagegen
    app.kubernetes.io/part-of: imagegen-serve
spec:
"""


def render(source_text: str) -> str:
    """Return the PrometheusRule document for the rule file text `source_text`.

    The source's leading comment block (its header) is dropped; every other line is
    indented by two spaces so that `groups:` lands under `spec:`.

    Raises:
        ValueError: if the source has no top-level `groups:` key.
    """
    lines = source_text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("groups:")), None)
    if start is None:
        raise ValueError("alerts.rules.yaml has no top-level `groups:` key")
    body = "".join(f"  {line}\n" if line.strip() else "\n" for line in lines[start:])
    return HEADER + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if prometheusrule.yaml is stale")
    args = parser.parse_args(argv)
    wanted = render(SOURCE.read_text(encoding="utf-8"))
    if args.check:
        if TARGET.read_text(encoding="utf-8") != wanted:
            print(f"{TARGET} is stale: run python {Path(__file__).as_posix()}", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
