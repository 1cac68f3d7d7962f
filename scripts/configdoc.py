"""Writes docs/configuration.md from the Settings class, the one source of every setting.

`make docs` runs it; tests/unit/test_docs_fresh.py fails when the committed page differs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from imagegen_server.config import Settings

REPO = Path(__file__).resolve().parent.parent
OUTPUT = REPO / "docs/configuration.md"
HEADER = """# Configuration reference

Generated from `imagegen_server.config.Settings` by `make docs`; do not edit by hand.

Every setting is a flag of `imagegen-server serve` (`--kebab-case`), an environment variable
(`IMAGEGEN_UPPER_SNAKE`) and a key of the YAML file named by `--config` / `IMAGEGEN_CONFIG`.
Precedence: flags > environment > YAML > defaults. List values take JSON on the command line
(`--preferred-batch-sizes '[2,4]'`) and in the environment. The server prints the resolved
settings once at start-up and refuses inconsistent ones with a message naming them.

| flag | environment | default | meaning |
| --- | --- | --- | --- |
"""


def render() -> str:
    rows = []
    for name, field in Settings.model_fields.items():
        default = (
            "required"
            if field.is_required()
            else repr(field.get_default(call_default_factory=True))
        )
        meaning = (field.description or "").replace("|", "\\|")
        flag = f"--{name.replace('_', '-')}"
        rows.append(f"| `{flag}` | `IMAGEGEN_{name.upper()}` | `{default}` | {meaning} |")
    return HEADER + "\n".join(rows) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=OUTPUT)
    args = parser.parse_args()
    args.out.write_text(render(), encoding="utf-8")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
