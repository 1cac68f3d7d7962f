"""Who may call what: bearer tokens with roles, and a per-client token-bucket rate limit.

Tokens come from a file (a mounted Kubernetes Secret in production): one `role:token` per line,
role `client` or `admin`, or a YAML document giving each token a policy (policy.py). Only their
SHA-256 digests are kept, and a presented token is compared against every digest with
`hmac.compare_digest`, so neither the time taken nor the memory of the server gives the tokens
away. Admin may do everything a client may.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..base.errors import PermissionDenied, RateLimited, Unauthenticated
from .policy import OTHER_TENANT, PolicyFile, Tenant, TokenPolicy, legacy_policy, parse_yaml

# Placeholder values shipped in example Secrets; a server refuses to start with one.
PLACEHOLDER_MARKERS = ("replace-me", "changeme", "example")
MIN_TOKEN_CHARS = 16


class Role(enum.IntEnum):
    CLIENT = 1
    ADMIN = 2


@dataclass(frozen=True, slots=True)
class Caller:
    identity: str  # "token:<digest prefix>" or "peer:<address>": the rate-limit key
    role: Role | None  # None = no token (only exempt methods)
    policy: TokenPolicy | None = None  # the token's policy; None = no token, or no auth at all


# The caller of the request being served, set by the interceptor (or the HTTP route) once the
# guard has checked it; read by the servicer (idempotency scope, cancel by id, policy, quotas,
# fair share) and the access log. Per task, so per call. None = no guard (no auth, no limit).
CURRENT_CALLER: ContextVar[Caller | None] = ContextVar("imagegen_caller", default=None)
ANONYMOUS = "anonymous"  # the one identity of every caller when authentication is off


def current_identity() -> tuple[str, bool]:
    """The identity of the caller being served and whether it has the admin role; without a
    token (authentication off) every caller is ANONYMOUS and no caller is admin."""
    caller = CURRENT_CALLER.get()
    if caller is None or caller.role is None:
        return ANONYMOUS, False
    return caller.identity, caller.role >= Role.ADMIN


def current_tenant() -> str:
    """The metrics' tenant label of the caller being served: its token's tenant, or `other`
    (no token policy, or no valid token)."""
    caller = CURRENT_CALLER.get()
    policy = caller.policy if caller is not None else None
    return policy.tenant.name if policy is not None else OTHER_TENANT


class TokenAuthenticator:
    def __init__(
        self,
        digests: Sequence[tuple[bytes, Role]],
        policies: Sequence[TokenPolicy] | None = None,
        tenants: dict[str, Tenant] | None = None,
    ) -> None:
        self._digests = list(digests)
        self._policies = list(policies) if policies is not None else None  # one per digest
        self.tenants = tenants or {}  # the tenants the file names (metric labels, quotas)

    @classmethod
    def from_file(cls, path: Path) -> TokenAuthenticator:
        """Reads `role:token` lines or the YAML form (policy.py).

        Raises:
            ValueError: a malformed line or entry (named), an unknown role, a short or
                placeholder token.
        """
        text = path.read_text(encoding="utf-8")
        parsed = parse_yaml(path, text, _digest, _check_token)
        if parsed is None:
            parsed = _parse_lines(path, text)
        roles = [(digest, Role[policy.role.upper()]) for digest, policy in parsed.entries]
        policies = [policy for _, policy in parsed.entries]
        return cls(roles, policies, parsed.tenants)

    def role_of(self, token: str) -> Role | None:
        """The token's role, or None; takes the same time whether or where it matches."""
        found = self._find(token)
        return None if found is None else self._digests[found][1]

    def policy_of(self, token: str) -> TokenPolicy | None:
        """The token's policy, or None for an unknown token."""
        found = self._find(token)
        if found is None:
            return None
        if self._policies is None:
            return legacy_policy(self._digests[found][1].name.lower(), found + 1)
        return self._policies[found]

    def _find(self, token: str) -> int | None:
        """The index of the token's entry; compares against every digest (constant time)."""
        presented = _digest(token)
        found: int | None = None
        for index, (digest, _) in enumerate(self._digests):
            if hmac.compare_digest(digest, presented):
                found = index
        return found


def _check_token(where: str, token: str) -> None:
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"{where}: tokens need at least {MIN_TOKEN_CHARS} characters")
    if any(marker in token.lower() for marker in PLACEHOLDER_MARKERS):
        raise ValueError(f"{where}: a placeholder token; put a real secret there")


def _parse_lines(path: Path, text: str) -> PolicyFile:
    """The original form: `role:token` lines, every token with the default policy."""
    parsed = PolicyFile()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        role_name, separator, token = line.partition(":")
        where = f"{path}:{number}"
        if not separator or role_name.strip().upper() not in Role.__members__:
            raise ValueError(f"{where}: expected `client:TOKEN` or `admin:TOKEN`")
        token = token.strip()
        _check_token(where, token)
        policy = legacy_policy(role_name.strip().lower(), number)
        parsed.entries.append((_digest(token), policy))
    if not parsed.entries:
        raise ValueError(f"{path}: no tokens")
    return parsed


class Guard:
    """Checks each call's token and role, then its client's rate. Runs on the event loop."""

    def __init__(
        self,
        authenticator: TokenAuthenticator | None,
        required: Callable[[str], Role | None],
        limiter: RateLimiter | None,
        limited: Callable[[str], bool],
    ) -> None:
        self._authenticator = authenticator
        self._required = required  # method -> role it needs (None = open)
        self._limiter = limiter
        self._limited = limited  # method -> whether it counts against the rate limit

    @property
    def authenticator(self) -> TokenAuthenticator | None:
        return self._authenticator

    def reload(self, authenticator: TokenAuthenticator) -> None:
        """Swaps in a re-read tokens file (SIGHUP). Calls already checked keep the policy they
        were admitted with; only calls checked from now on see the new one."""
        self._authenticator = authenticator

    def needs_check(self, method: str) -> bool:
        needs_role = self._authenticator is not None and self._required(method) is not None
        return needs_role or (self._limiter is not None and self._limited(method))

    def check(self, method: str, metadata: Iterable[Any], peer: str) -> Caller:
        """Raises Unauthenticated, PermissionDenied or RateLimited."""
        caller = self._identify(metadata, peer)
        needed = self._required(method) if self._authenticator is not None else None
        if needed is not None:
            if caller.role is None:
                raise Unauthenticated("missing or unknown bearer token (authorization: Bearer ...)")
            if caller.role < needed:
                raise PermissionDenied(
                    f"{method.rsplit('/', 1)[-1]} needs the {needed.name.lower()} role"
                )
        if self._limiter is not None and self._limited(method):
            wait_s = self._limiter.acquire(caller.identity)
            if wait_s > 0:
                rate = self._limiter.rate_per_s
                raise RateLimited(
                    f"rate limit of {rate:g} requests/s exceeded; retry in {wait_s:.2f}s",
                    retry_after_s=wait_s,
                )
        return caller

    def _identify(self, metadata: Iterable[Any], peer: str) -> Caller:
        token = _bearer(metadata)
        if token is not None and self._authenticator is not None:
            policy = self._authenticator.policy_of(token)
            if policy is not None:
                role = Role[policy.role.upper()]
                return Caller(f"token:{_digest(token).hex()[:16]}", role, policy)
        # Unauthenticated callers share their address's bucket (port dropped: reconnecting
        # must not buy a fresh bucket).
        return Caller(f"peer:{peer.rsplit(':', 1)[0]}", None)


class RateLimiter:
    """Token buckets per client: `rate_per_s` refill, `burst` capacity, bounded client count."""

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        max_clients: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate_per_s = rate_per_s
        self._burst = burst
        self._max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, updated

    def acquire(self, client: str) -> float:
        """Takes one token for `client`; returns 0, or the seconds until one is available."""
        now = self._clock()
        tokens, updated = self._buckets.pop(client, (float(self._burst), now))
        tokens = min(float(self._burst), tokens + (now - updated) * self.rate_per_s)
        wait_s = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait_s = (1 - tokens) / self.rate_per_s
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > self._max_clients:
            self._buckets.popitem(last=False)  # the least recently seen: full again if it returns
        return wait_s


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def _bearer(metadata: Iterable[Any]) -> str | None:
    for key, value in metadata:
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None
