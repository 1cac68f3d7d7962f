"""Per-token policy: the tokens file's schema, its validation, and the checks a request passes.

The tokens file is either the original one `role:token` per line (every token then has the
default policy: any priority, any adapter, any variant, tenant `default`, weight 1, no quota) or
a YAML document (docs/security.md, "Tokens file"):

    tenants:
      acme: {weight: 3, rate_per_s: 20, burst: 200, per_hour: 50000, per_day: 400000}
    tokens:
      - name: acme-batch          # a label for messages and logs (default: tokens[N])
        token: "..."              # or sha256: "<hex digest of the token>"
        role: client              # client | admin
        tenant: acme              # default: default
        priority: {highest: 2, lowest: 3}
        adapters: ["style-*"]     # fnmatch patterns; default ["*"]
        variants: ["*"]

Quota amounts are in the cost unit (megapixel-steps, base/cost.py). A request whose priority is
more urgent than its token's `highest` is refused with PERMISSION_DENIED naming `priority`
(refused, not clamped: a client that asked for urgency must learn it does not have it).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..base.errors import PermissionDenied
from ..base.types import GenerationParams

DEFAULT_TENANT = "default"
OTHER_TENANT = "other"  # the metric label of tenants the tokens file does not name
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
TOKEN_KEYS = {"name", "token", "sha256", "role", "tenant", "priority", "adapters", "variants"}
TENANT_KEYS = {"weight", "rate_per_s", "burst", "per_hour", "per_day"}
ROLES = ("client", "admin")


@dataclass(frozen=True, slots=True)
class Quota:
    """A tenant's budget in cost units; 0 turns a limit off."""

    rate_per_s: float = 0.0  # token bucket refill per second (0 = no bucket)
    burst: float = 0.0  # token bucket capacity: the most spent at once after a pause
    per_hour: float = 0.0  # spent per clock hour (UTC, aligned), refilled at the hour
    per_day: float = 0.0  # spent per UTC day, refilled at midnight

    @property
    def limited(self) -> bool:
        return bool(self.rate_per_s or self.per_hour or self.per_day)

    def windows(self) -> list[tuple[str, float, float]]:
        """(name, length in seconds, limit) of the windowed quotas that are on."""
        spans = (("hour", 3600.0, self.per_hour), ("day", 86400.0, self.per_day))
        return [span for span in spans if span[2] > 0]


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str  # groups tokens for fair share, quotas, logs and metrics
    weight: float = 1.0  # share of the engine when tenants of one priority compete
    quota: Quota = Quota()  # cost budget, shared by every token of the tenant


@dataclass(frozen=True, slots=True)
class TokenPolicy:
    """What one token may do."""

    name: str  # the entry's label (messages and logs; never the token itself)
    role: str  # "client" or "admin"
    tenant: Tenant  # who its requests are billed to
    highest_priority: int = 1  # most urgent level it may ask for (1 = highest)
    lowest_priority: int = 0  # least urgent level it may ask for; 0 = any
    adapters: tuple[str, ...] = ("*",)  # fnmatch patterns of adapter names it may use
    variants: tuple[str, ...] = ("*",)  # fnmatch patterns of variant names it may ask for

    def check(self, params: GenerationParams, variant: str = "") -> None:
        """Raises PermissionDenied naming the field the policy refuses."""
        lowest = self.lowest_priority or params.priority
        if not self.highest_priority <= params.priority <= lowest:
            raise PermissionDenied(
                f"priority: {params.priority} is outside this token's allowed range"
                f" [{self.highest_priority}, {self.lowest_priority or 'any'}] (1 = highest)"
            )
        for spec in params.adapters:
            if not _matches(spec.name, self.adapters):
                raise PermissionDenied(f"adapters: this token may not use adapter {spec.name!r}")
        if variant and not _matches(variant, self.variants):
            raise PermissionDenied(f"variant: this token may not use variant {variant!r}")


@dataclass(slots=True)
class PolicyFile:
    """A parsed tokens file: (token digest, policy) per entry, and the tenants it names."""

    entries: list[tuple[bytes, TokenPolicy]] = field(default_factory=list)  # digest, policy
    tenants: dict[str, Tenant] = field(default_factory=dict)  # by name


def legacy_policy(role: str, number: int) -> TokenPolicy:
    """The policy of a `role:token` line: everything allowed, tenant `default`."""
    return TokenPolicy(f"line {number}", role, Tenant(DEFAULT_TENANT))


def parse_yaml(path: Path, text: str, digest: Any, check_token: Any) -> PolicyFile | None:
    """The YAML form of the tokens file, or None if `text` is the line form.

    Raises:
        ValueError: naming the file and the entry (tokens[N] or tenants.NAME) and the problem.
    """
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    if not isinstance(document, dict) or "tokens" not in document:
        return None
    unknown = set(document) - {"tokens", "tenants"}
    if unknown:
        raise ValueError(
            f"{path}: unknown top-level keys {sorted(unknown)}; expected tokens, tenants"
        )
    tenants = _tenants(path, document.get("tenants") or {})
    tokens = document["tokens"]
    if not isinstance(tokens, list) or not tokens:
        raise ValueError(f"{path}: tokens must be a non-empty list")
    parsed = PolicyFile(tenants=tenants)
    for index, entry in enumerate(tokens):
        where = f"{path}: tokens[{index}]"
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            where += f" ({entry['name']})"
        parsed.entries.append(_token(where, index, entry, tenants, digest, check_token))
    return parsed


def _tenants(path: Path, raw: Any) -> dict[str, Tenant]:
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: tenants must be a mapping of name to settings")
    tenants = {}
    for name, given in raw.items():
        where = f"{path}: tenants.{name}"
        if not isinstance(name, str) or not TENANT_NAME.match(name) or name == OTHER_TENANT:
            raise ValueError(f"{where}: a tenant name is 1-63 of [A-Za-z0-9_.-], not `other`")
        settings = given or {}
        if not isinstance(settings, dict) or set(settings) - TENANT_KEYS:
            raise ValueError(f"{where}: expected a mapping with keys among {sorted(TENANT_KEYS)}")
        numbers = {key: _number(where, key, settings.get(key, 0)) for key in TENANT_KEYS}
        weight = settings.get("weight", 1.0)
        if _number(where, "weight", weight) <= 0:
            raise ValueError(f"{where}: weight must be > 0")
        if numbers["rate_per_s"] > 0 and numbers["burst"] <= 0:
            raise ValueError(f"{where}: rate_per_s needs a burst > 0 (the bucket's capacity)")
        quota = Quota(
            numbers["rate_per_s"], numbers["burst"], numbers["per_hour"], numbers["per_day"]
        )
        tenants[name] = Tenant(name, float(weight), quota)
    return tenants


def _token(
    where: str,
    index: int,
    entry: Any,
    tenants: dict[str, Tenant],
    digest: Any,
    check_token: Any,
) -> tuple[bytes, TokenPolicy]:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a mapping with token (or sha256) and role")
    unknown = set(entry) - TOKEN_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed {sorted(TOKEN_KEYS)}")
    token_digest = _token_digest(where, entry, digest, check_token)
    role = entry.get("role")
    if role not in ROLES:
        raise ValueError(f"{where}: role must be one of {list(ROLES)}, got {role!r}")
    tenant_name = entry.get("tenant", DEFAULT_TENANT)
    if not isinstance(tenant_name, str) or not TENANT_NAME.match(tenant_name):
        raise ValueError(f"{where}: tenant must be 1-63 of [A-Za-z0-9_.-], got {tenant_name!r}")
    highest, lowest = _priority(where, entry.get("priority", {}))
    policy = TokenPolicy(
        name=str(entry.get("name", f"tokens[{index}]")),
        role=role,
        tenant=tenants.get(tenant_name, Tenant(tenant_name)),
        highest_priority=highest,
        lowest_priority=lowest,
        adapters=_patterns(where, "adapters", entry.get("adapters", ["*"])),
        variants=_patterns(where, "variants", entry.get("variants", ["*"])),
    )
    return token_digest, policy


def _token_digest(where: str, entry: dict[str, Any], digest: Any, check_token: Any) -> bytes:
    if ("token" in entry) == ("sha256" in entry):
        raise ValueError(f"{where}: give exactly one of token and sha256")
    if "sha256" in entry:
        hexdigest = str(entry["sha256"]).lower()
        if not SHA256_HEX.match(hexdigest):
            raise ValueError(f"{where}: sha256 must be 64 hex digits")
        return bytes.fromhex(hexdigest)
    token = entry["token"]
    if not isinstance(token, str):
        raise ValueError(f"{where}: token must be a string")
    check_token(where, token)
    result: bytes = digest(token)
    return result


def _priority(where: str, raw: Any) -> tuple[int, int]:
    if not isinstance(raw, dict) or set(raw) - {"highest", "lowest"}:
        raise ValueError(f"{where}: priority must be a mapping with highest and/or lowest")
    highest, lowest = raw.get("highest", 1), raw.get("lowest", 0)
    for key, value in (("highest", highest), ("lowest", lowest)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (key == "highest"):
            raise ValueError(f"{where}: priority.{key} must be an integer >= 1 (1 = highest)")
    if lowest and lowest < highest:
        raise ValueError(f"{where}: priority.lowest ({lowest}) is above highest ({highest})")
    return highest, lowest


def _patterns(where: str, key: str, raw: Any) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(item, str) and item for item in raw):
        raise ValueError(f"{where}: {key} must be a list of name patterns (fnmatch, e.g. style-*)")
    return tuple(raw)


def _number(where: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{where}: {key} must be a number >= 0, got {value!r}")
    return float(value)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
