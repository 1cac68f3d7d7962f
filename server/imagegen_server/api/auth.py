"""Who may call what: bearer tokens with roles, and a per-client token-bucket rate limit.

Tokens come from a file (a mounted Kubernetes Secret in production): one `role:token` per line,
role `client` or `admin`. Only their SHA-256 digests are kept, and a presented token is compared
against every digest with `hmac.compare_digest`, so neither the time taken nor the memory of the
server gives the tokens away. Admin may do everything a client may.
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


# The caller of the RPC being served, set by the interceptor once the guard has checked it: the
# servicer scopes idempotency keys and cancels by it. None = no guard (no auth, no rate limit).
CURRENT_CALLER: ContextVar[Caller | None] = ContextVar("imagegen_caller", default=None)
ANONYMOUS = "anonymous"  # the one identity of every caller when authentication is off


def current_identity() -> tuple[str, bool]:
    """The identity of the caller being served and whether it has the admin role; without a
    token (authentication off) every caller is ANONYMOUS and no caller is admin."""
    caller = CURRENT_CALLER.get()
    if caller is None or caller.role is None:
        return ANONYMOUS, False
    return caller.identity, caller.role >= Role.ADMIN


class TokenAuthenticator:
    def __init__(self, digests: Sequence[tuple[bytes, Role]]) -> None:
        self._digests = list(digests)

    @classmethod
    def from_file(cls, path: Path) -> TokenAuthenticator:
        """Reads `role:token` lines.

        Raises:
            ValueError: a malformed line, an unknown role, a short or placeholder token.
        """
        digests = []
        for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            role_name, separator, token = line.partition(":")
            where = f"{path}:{number}"
            if not separator or role_name.strip().upper() not in Role.__members__:
                raise ValueError(f"{where}: expected `client:TOKEN` or `admin:TOKEN`")
            token = token.strip()
            if len(token) < MIN_TOKEN_CHARS:
                raise ValueError(f"{where}: tokens need at least {MIN_TOKEN_CHARS} characters")
            if any(marker in token.lower() for marker in PLACEHOLDER_MARKERS):
                raise ValueError(f"{where}: a placeholder token; put a real secret there")
            digests.append((_digest(token), Role[role_name.strip().upper()]))
        if not digests:
            raise ValueError(f"{path}: no tokens")
        return cls(digests)

    def role_of(self, token: str) -> Role | None:
        """The token's role, or None; takes the same time whether or where it matches."""
        presented = _digest(token)
        found: Role | None = None
        for digest, role in self._digests:
            if hmac.compare_digest(digest, presented):
                found = role
        return found


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
            role = self._authenticator.role_of(token)
            if role is not None:
                return Caller(f"token:{_digest(token).hex()[:16]}", role)
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
