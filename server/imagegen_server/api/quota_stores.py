"""Quota stores that outlive the process: an SQLite file (one host) and Redis (a fleet).

Both apply quota.py's rule atomically: SQLite in an IMMEDIATE transaction (a write lock, so
processes sharing the file serialise), Redis in one Lua script (Redis runs a script alone).
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

from .policy import Quota
from .quota import QuotaStore, StoreUnavailable, decide, window_end, window_index

REDIS_TIMEOUT_S = 0.5  # a quota check must not hold a request for long
KEY_PREFIX = "imagegen:quota"

SCHEMA = """
CREATE TABLE IF NOT EXISTS buckets (tenant TEXT PRIMARY KEY, tokens REAL, updated REAL);
CREATE TABLE IF NOT EXISTS windows (
    tenant TEXT, window TEXT, idx INTEGER, spent REAL, PRIMARY KEY (tenant, window)
);
"""

# KEYS[1] = bucket hash, KEYS[2..] = window counters; ARGV = now, cost, rate, burst, then
# (limit, window end) per window. Returns the wait in seconds as a string ("0" = spent).
SPEND_SCRIPT = """
local now, cost = tonumber(ARGV[1]), tonumber(ARGV[2])
local rate, burst = tonumber(ARGV[3]), tonumber(ARGV[4])
local wait, tokens = 0, burst
if rate > 0 then
  local state = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
  if state[1] then
    tokens = math.min(burst, tonumber(state[1]) + math.max(0, now - tonumber(state[2])) * rate)
  end
  local need = math.min(cost, burst)
  if tokens < need then wait = (need - tokens) / rate end
end
for i = 2, #KEYS do
  local limit, ends = tonumber(ARGV[3 + 2 * (i - 1)]), tonumber(ARGV[4 + 2 * (i - 1)])
  local spent = tonumber(redis.call('GET', KEYS[i]) or '0')
  if spent + cost > limit then wait = math.max(wait, ends - now) end
end
if wait > 0 then return tostring(wait) end
if rate > 0 then
  local left = tokens - cost
  redis.call('HSET', KEYS[1], 'tokens', tostring(left), 'updated', tostring(now))
  redis.call('EXPIRE', KEYS[1], math.ceil((burst - left) / rate) + 60)
end
for i = 2, #KEYS do
  redis.call('INCRBYFLOAT', KEYS[i], ARGV[2])
  redis.call('EXPIREAT', KEYS[i], math.ceil(tonumber(ARGV[4 + 2 * (i - 1)])) + 60)
end
return '0'
"""


class SqliteStore:
    """One file, shared by the processes of one host; survives restarts."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()  # one connection, used from worker threads

    def spend(self, tenant: str, cost: float, quota: Quota, now: float) -> float:
        try:
            with self._lock:
                return self._spend(tenant, cost, quota, now)
        except sqlite3.Error as error:
            raise StoreUnavailable(f"sqlite: {error}") from error

    def _spend(self, tenant: str, cost: float, quota: Quota, now: float) -> float:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(
                "SELECT tokens, updated FROM buckets WHERE tenant = ?", (tenant,)
            ).fetchone()
            windows = quota.windows()
            spent = [
                self._spent(tenant, name, window_index(now, length)) for name, length, _ in windows
            ]
            decision = decide(quota, cost, now, row, spent)
            if decision.wait_s == 0:
                self._write(tenant, cost, quota, now, decision.tokens, spent)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return decision.wait_s

    def _spent(self, tenant: str, window: str, index: int) -> float:
        row = self._db.execute(
            "SELECT idx, spent FROM windows WHERE tenant = ? AND window = ?", (tenant, window)
        ).fetchone()
        return float(row[1]) if row is not None and row[0] == index else 0.0

    def _write(
        self, tenant: str, cost: float, quota: Quota, now: float, tokens: float, spent: list[float]
    ) -> None:
        if quota.rate_per_s > 0:
            self._db.execute(
                "INSERT OR REPLACE INTO buckets VALUES (?, ?, ?)", (tenant, tokens, now)
            )
        for (name, length, _), used in zip(quota.windows(), spent, strict=True):
            self._db.execute(
                "INSERT OR REPLACE INTO windows VALUES (?, ?, ?, ?)",
                (tenant, name, window_index(now, length), used + cost),
            )


class RedisStore:
    """One budget per tenant for every replica that points at the same Redis."""

    def __init__(self, url: str) -> None:
        try:
            import redis  # only servers configured for Redis need the client
        except ImportError as error:
            raise ValueError(
                "quota_store: a redis:// store needs the `redis` package (pip install redis)"
            ) from error

        self._errors: tuple[type[BaseException], ...] = (redis.exceptions.RedisError, OSError)
        self._client: Any = redis.Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
        )
        self._script = self._client.register_script(SPEND_SCRIPT)

    def spend(self, tenant: str, cost: float, quota: Quota, now: float) -> float:
        keys = [f"{KEY_PREFIX}:{{{tenant}}}:bucket"]  # {tenant}: one hash slot per tenant
        args: list[str] = [repr(now), repr(cost), repr(quota.rate_per_s), repr(quota.burst)]
        for name, length, limit in quota.windows():
            keys.append(f"{KEY_PREFIX}:{{{tenant}}}:{name}:{window_index(now, length)}")
            args += [repr(limit), repr(window_end(now, length))]
        try:
            return float(self._script(keys=keys, args=args))
        except self._errors as error:
            raise StoreUnavailable(f"redis: {error}") from error


def open_store(spec: str) -> tuple[QuotaStore, bool]:
    """The store `spec` names ("memory", "sqlite:PATH", "redis://..." or "rediss://..."), and
    whether it blocks (does I/O).

    Raises:
        ValueError: an unknown form.
    """
    if spec == "memory":
        from .quota import MemoryStore

        return MemoryStore(), False
    if spec.startswith("sqlite:"):
        return SqliteStore(Path(spec.removeprefix("sqlite:"))), True
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(spec), True
    raise ValueError(f"quota_store: expected memory, sqlite:PATH or redis://..., got {spec!r}")
