"""Quota stores that outlive the process: an SQLite file (one host) and Redis (a fleet).

Both apply quota.py's rules (spend, refund) atomically: SQLite in an IMMEDIATE transaction (a
write lock, so processes sharing the file serialise), Redis in one Lua script (Redis runs a
script alone).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .policy import Quota
from .quota import QuotaStore, StoreUnavailable, decide, refilled, window_end, window_index

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

# A refund: KEYS as SPEND_SCRIPT's, the windows those of the time it was spent; ARGV = now,
# cost, rate, burst. The bucket gains the cost back (never above burst); a window that still
# exists (it has not expired) gives it back (never below 0).
REFUND_SCRIPT = """
local now, cost = tonumber(ARGV[1]), tonumber(ARGV[2])
local rate, burst = tonumber(ARGV[3]), tonumber(ARGV[4])
if rate > 0 then
  local state = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
  if state[1] then
    local refill = math.max(0, now - tonumber(state[2])) * rate
    local tokens = math.min(burst, tonumber(state[1]) + refill + cost)
    redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'updated', tostring(now))
  end
end
for i = 2, #KEYS do
  local spent = redis.call('GET', KEYS[i])
  if spent then
    redis.call('SET', KEYS[i], tostring(math.max(0, tonumber(spent) - cost)), 'KEEPTTL')
  end
end
return 0
"""


class SqliteStore:
    """One file, shared by the processes of one host; survives restarts."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()  # one connection, used from worker threads

    def spend(self, tenant: str, cost: float, quota: Quota, now: float) -> float:
        with self._transaction():
            windows = quota.windows()
            spent = [
                self._spent(tenant, name, window_index(now, length)) for name, length, _ in windows
            ]
            decision = decide(quota, cost, now, self._bucket(tenant), spent)
            if decision.wait_s == 0:
                self._write(tenant, cost, quota, now, decision.tokens, spent)
            return decision.wait_s

    def refund(self, tenant: str, cost: float, quota: Quota, spent_at: float, now: float) -> None:
        with self._transaction() as db:
            bucket = self._bucket(tenant)
            if quota.rate_per_s > 0 and bucket is not None:
                db.execute(
                    "UPDATE buckets SET tokens = ?, updated = ? WHERE tenant = ?",
                    (refilled(quota, cost, now, bucket), now, tenant),
                )
            for name, length, _ in quota.windows():
                db.execute(
                    "UPDATE windows SET spent = MAX(0, spent - ?)"
                    " WHERE tenant = ? AND window = ? AND idx = ?",
                    (cost, tenant, name, window_index(spent_at, length)),
                )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (processes sharing the file take turns), committed if the
        block returns; any SQLite error is the store being unavailable."""
        try:
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
        except sqlite3.Error as error:
            raise StoreUnavailable(f"sqlite: {error}") from error

    def _bucket(self, tenant: str) -> tuple[float, float] | None:
        row = self._db.execute(
            "SELECT tokens, updated FROM buckets WHERE tenant = ?", (tenant,)
        ).fetchone()
        return (float(row[0]), float(row[1])) if row is not None else None

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
        self._spend = self._client.register_script(SPEND_SCRIPT)
        self._refund = self._client.register_script(REFUND_SCRIPT)

    def spend(self, tenant: str, cost: float, quota: Quota, now: float) -> float:
        keys = _keys(tenant, quota, now)
        args: list[str] = [repr(now), repr(cost), repr(quota.rate_per_s), repr(quota.burst)]
        for _, length, limit in quota.windows():
            args += [repr(limit), repr(window_end(now, length))]
        try:
            return float(self._spend(keys=keys, args=args))
        except self._errors as error:
            raise StoreUnavailable(f"redis: {error}") from error

    def refund(self, tenant: str, cost: float, quota: Quota, spent_at: float, now: float) -> None:
        args = [repr(now), repr(cost), repr(quota.rate_per_s), repr(quota.burst)]
        try:
            self._refund(keys=_keys(tenant, quota, spent_at), args=args)
        except self._errors as error:
            raise StoreUnavailable(f"redis: {error}") from error


def _keys(tenant: str, quota: Quota, now: float) -> list[str]:
    """The tenant's bucket, then its windows at `now`; `{tenant}`: one hash slot per tenant."""
    keys = [f"{KEY_PREFIX}:{{{tenant}}}:bucket"]
    for name, length, _ in quota.windows():
        keys.append(f"{KEY_PREFIX}:{{{tenant}}}:{name}:{window_index(now, length)}")
    return keys


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
