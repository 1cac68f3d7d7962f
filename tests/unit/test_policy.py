"""The tokens file's YAML form: its schema, validation naming the entry, and the policy checks."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from imagegen_server.api.auth import Role, TokenAuthenticator
from imagegen_server.base.errors import PermissionDenied
from imagegen_server.base.types import AdapterSpec
from support import engine_params

BATCH = "batch-token-0123456789"
ADMIN = "admin-token-0123456789"
HASHED = "hashed-token-0123456789"

POLICY = f"""
tenants:
  acme: {{weight: 3, rate_per_s: 20, burst: 200, per_hour: 5000, per_day: 40000}}
tokens:
  - name: acme-batch
    token: {BATCH}
    role: client
    tenant: acme
    priority: {{highest: 2, lowest: 3}}
    adapters: ["style-*"]
    variants: ["fast*"]
  - name: ops
    token: {ADMIN}
    role: admin
  - name: hashed
    sha256: {hashlib.sha256(HASHED.encode()).hexdigest()}
    role: client
    tenant: undeclared
"""


def load(tmp_path: Path, text: str) -> TokenAuthenticator:
    path = tmp_path / "tokens.yaml"
    path.write_text(text)
    return TokenAuthenticator.from_file(path)


def test_yaml_tokens_carry_their_policy_and_tenant(tmp_path: Path) -> None:
    authenticator = load(tmp_path, POLICY)
    batch = authenticator.policy_of(BATCH)
    assert batch is not None and authenticator.role_of(BATCH) is Role.CLIENT
    assert (batch.tenant.name, batch.tenant.weight, batch.tenant.quota.per_hour) == (
        "acme",
        3.0,
        5000.0,
    )
    assert authenticator.role_of(ADMIN) is Role.ADMIN
    hashed = authenticator.policy_of(HASHED)
    assert hashed is not None and hashed.tenant.name == "undeclared"
    assert not hashed.tenant.quota.limited
    assert authenticator.policy_of("unknown-token-0123456789") is None


def test_the_line_form_still_loads_with_the_default_policy(tmp_path: Path) -> None:
    authenticator = load(tmp_path, f"client:{BATCH}\nadmin:{ADMIN}\n")
    policy = authenticator.policy_of(BATCH)
    assert policy is not None and policy.tenant.name == "default"
    policy.check(engine_params("any", priority=1))


def test_priority_above_the_cap_is_refused_naming_priority(tmp_path: Path) -> None:
    policy = load(tmp_path, POLICY).policy_of(BATCH)
    assert policy is not None
    policy.check(engine_params("ok", priority=2))
    for priority in (1, 4):
        with pytest.raises(PermissionDenied, match=r"^priority: .* allowed range \[2, 3\]"):
            policy.check(engine_params("no", priority=priority))


def test_adapter_and_variant_patterns(tmp_path: Path) -> None:
    policy = load(tmp_path, POLICY).policy_of(BATCH)
    assert policy is not None
    params = engine_params("p", priority=2)
    object.__setattr__(params, "adapters", (AdapterSpec("style-ink", 1.0),))
    policy.check(params, variant="fast-4step")
    policy.check(params)  # the default variant is always allowed
    with pytest.raises(PermissionDenied, match=r"^variant: .*'full'"):
        policy.check(params, variant="full")
    object.__setattr__(params, "adapters", (AdapterSpec("ink", 1.0),))
    with pytest.raises(PermissionDenied, match=r"^adapters: .*'ink'"):
        policy.check(params)


@pytest.mark.parametrize(
    "entry,message",
    [
        (f"- {{name: bad, token: {BATCH}, role: root}}", r"tokens\[0\] \(bad\): role must be"),
        (f"- {{token: {BATCH}, role: client, colour: red}}", r"tokens\[0\]: unknown keys"),
        ("- {name: short, token: abc, role: client}", r"\(short\): tokens need at least 16"),
        ("- {name: both, role: client}", r"\(both\): give exactly one of token and sha256"),
        (
            f"- {{name: inverted, token: {BATCH}, role: client,"
            " priority: {highest: 3, lowest: 2}}",
            r"\(inverted\): priority.lowest \(2\) is above highest \(3\)",
        ),
        (
            f"- {{name: zero, token: {BATCH}, role: client, priority: {{highest: 0}}}}",
            r"\(zero\): priority.highest must be an integer >= 1",
        ),
        (
            f"- {{name: pat, token: {BATCH}, role: client, adapters: style-*}}",
            r"\(pat\): adapters must be a list",
        ),
        (
            f"- {{name: who, token: {BATCH}, role: client, tenant: 'a b'}}",
            r"\(who\): tenant must be",
        ),
    ],
)
def test_a_malformed_entry_is_named(tmp_path: Path, entry: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load(tmp_path, f"tokens:\n  {entry}\n")


@pytest.mark.parametrize(
    "tenants,message",
    [
        ("acme: {weight: 0}", r"tenants.acme: weight must be > 0"),
        ("acme: {rate_per_s: 5}", r"tenants.acme: rate_per_s needs a burst"),
        ("acme: {per_hour: -1}", r"tenants.acme: per_hour must be a number >= 0"),
        ("other: {weight: 1}", r"tenants.other: a tenant name"),
        ("acme: {burst_size: 1}", r"tenants.acme: expected a mapping with keys among"),
    ],
)
def test_a_malformed_tenant_is_named(tmp_path: Path, tenants: str, message: str) -> None:
    text = f"tenants:\n  {tenants}\ntokens:\n  - {{token: {BATCH}, role: client}}\n"
    with pytest.raises(ValueError, match=message):
        load(tmp_path, text)
