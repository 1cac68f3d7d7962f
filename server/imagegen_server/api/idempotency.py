"""Idempotency keys: what a valid key is, the fingerprint that tells a faithful repeat from a
different request under the same key, and the bounded memory of keyed jobs (in flight, and
finished within the window), evicted oldest-first."""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from typing import TYPE_CHECKING, Any

from PIL.Image import Image as PILImage

from ..base.errors import FailedPrecondition, InvalidArgument
from ..base.metrics import Metrics
from ..base.types import GenerationParams

if TYPE_CHECKING:  # jobs.py imports this module
    from .jobs import Job

KEY_PATTERN = re.compile(r"[\x21-\x7e]{1,255}")  # printable ASCII, no spaces (Stripe's length)
# Parameters that do not change the images: a repeat may differ in them (a unary first call and
# a streaming repeat differ in previews).
UNFINGERPRINTED = frozenset({"request_id", "preview_every_n_steps"})


@dataclass(frozen=True, slots=True)
class JobSettings:
    window_s: float  # how long a finished result waits for a repeat of its key
    max_entries: int  # keys remembered, in flight and finished
    max_bytes: int  # encoded image bytes kept for repeats


class KeyedJobs:
    """Jobs by (caller, key), oldest first: in flight, then finished with their result.

    A job that failed leaves at once (a repeat runs anew). A finished result stays until its
    window passes, or until the entry or byte bound evicts it, oldest-finished first; then a
    tombstone remembers the key until its window would have ended, so a late repeat is told its
    result is gone rather than silently computed again. In-flight jobs are never evicted (the
    queue bounds them). Runs on the event loop.
    """

    def __init__(self, settings: JobSettings, metrics: Metrics, clock: Callable[[], float]) -> None:
        self._settings = settings
        self._metrics = metrics
        self.clock = clock  # replaceable: tests move time without sleeping
        self._jobs: OrderedDict[tuple[str, str], Job] = OrderedDict()
        self._evicted: OrderedDict[tuple[str, str], float] = OrderedDict()  # -> forgotten at
        self._bytes = 0  # encoded bytes of the finished results held

    def lookup(self, scope: str, key: str, fingerprint: str) -> Job | None:
        """The job a repeat joins or replays; None for a new key.

        Raises:
            FailedPrecondition: other parameters under the key, or its result was evicted.
        """
        self._expire()
        job = self._jobs.get((scope, key))
        if job is None:
            if (scope, key) in self._evicted:
                self._count("evicted")
                raise FailedPrecondition(
                    "idempotency_key: this key's result was evicted before its window ended (the"
                    " server's idempotency memory bound); repeat with a new key to compute again"
                )
            return None
        if job.fingerprint != fingerprint:
            self._count("conflict")
            raise FailedPrecondition(
                "idempotency_key: already used for a request with other parameters; use a new"
                " key for a new request"
            )
        self._count("replayed" if job.ended else "joined")
        return job

    def holds(self, scope: str, key: str) -> bool:
        """Whether the key names a job (without counting a lookup)."""
        self._expire()
        return (scope, key) in self._jobs

    def add(self, job: Job) -> None:
        """A new keyed job, accepted by the batcher."""
        assert job.key is not None
        self._count("new")
        self._evicted.pop((job.scope, job.key), None)
        self._jobs[(job.scope, job.key)] = job
        self._bound()

    def ended(self, job: Job) -> None:
        """A keyed job ended: its result is kept (and evicted in finishing order), a failed
        one forgotten."""
        assert job.key is not None
        entry = (job.scope, job.key)
        if job.result is not None:
            self._bytes += job.result.size_bytes
            self._jobs.move_to_end(entry)
        else:
            self._jobs.pop(entry, None)
        self._bound()

    def named(self, key: str) -> list[Job]:
        """Every caller's job under `key` (a cancel checks whose)."""
        self._expire()
        return [job for (_, job_key), job in self._jobs.items() if job_key == key]

    def _expire(self) -> None:
        """Drops finished results past their window, and tombstones past theirs."""
        now = self.clock()
        window = self._settings.window_s
        for entry, job in list(self._jobs.items()):
            if job.finished_at is not None and job.finished_at + window <= now:
                self._drop(entry, job, "expired", tombstone=False)
        while self._evicted and next(iter(self._evicted.values())) <= now:
            self._evicted.popitem(last=False)

    def _bound(self) -> None:
        """Evicts the oldest finished results while over the entry or byte bound."""
        self._expire()
        settings = self._settings
        for entry, job in list(self._jobs.items()):
            over_entries = len(self._jobs) > settings.max_entries
            over_bytes = self._bytes > settings.max_bytes
            if not (over_entries or over_bytes):
                break
            if job.ended:
                self._drop(entry, job, "entries" if over_entries else "bytes", tombstone=True)
        self._metrics.idempotency_entries.set(len(self._jobs))
        self._metrics.idempotency_bytes.set(self._bytes)

    def _drop(self, entry: tuple[str, str], job: Job, reason: str, tombstone: bool) -> None:
        del self._jobs[entry]
        if job.result is not None:
            self._bytes -= job.result.size_bytes
        self._metrics.idempotency_evictions.labels(reason=reason).inc()
        if tombstone and job.finished_at is not None:
            self._evicted[entry] = job.finished_at + self._settings.window_s
            while len(self._evicted) > self._settings.max_entries:
                self._evicted.popitem(last=False)

    def _count(self, outcome: str) -> None:
        self._metrics.idempotency_lookups.labels(outcome=outcome).inc()


def check_key(value: str, field_name: str = "idempotency_key") -> str | None:
    """A request's idempotency key, or None when it has none.

    Raises:
        InvalidArgument: not 1-255 printable ASCII characters without spaces.
    """
    if not value:
        return None
    if not KEY_PATTERN.fullmatch(value):
        raise InvalidArgument(field_name, "1-255 printable ASCII characters, no spaces")
    return value


def params_fingerprint(params: GenerationParams) -> str:
    """A digest of everything that makes the images: equal for a faithful repeat."""
    digest = hashlib.sha256()
    for item in fields(params):
        if item.name not in UNFINGERPRINTED:
            digest.update(item.name.encode())
            _feed(digest, getattr(params, item.name))
    return digest.hexdigest()


def _feed(digest: Any, value: object) -> None:
    if isinstance(value, PILImage):
        digest.update(f"{value.mode}{value.size}".encode())
        digest.update(value.tobytes())
    elif is_dataclass(value) and not isinstance(value, type):
        for item in fields(value):
            _feed(digest, getattr(value, item.name))
    elif isinstance(value, (tuple, list)):
        digest.update(b"[")
        for element in value:
            _feed(digest, element)
        digest.update(b"]")
    else:
        digest.update(repr(value).encode())
