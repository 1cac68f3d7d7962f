"""Re-reading the tokens file while serving: on SIGHUP, and when its content changes.

A reload swaps the guard's authenticator in one assignment on the event loop, so a call is
checked against the old file or the new one, never a mix; calls already admitted keep the
policy they were admitted with (their tenant, weight and charged cost do not change mid-flight).
A file that fails validation is refused with a log line naming the entry, and the old policy
stays in force: a typo must not lock every client out.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from pathlib import Path

from .auth import Guard, TokenAuthenticator

log = logging.getLogger(__name__)


class TokensWatcher:
    def __init__(self, guard: Guard, path: Path, poll_s: float) -> None:
        self._guard = guard
        self._path = path
        self._poll_s = poll_s  # 0 = reload on SIGHUP only
        self._seen = self._fingerprint()  # digest of the content last loaded
        self._task: asyncio.Task[None] | None = None
        self.reloads = 0  # successful reloads (tests and logs)

    def start(self) -> None:
        if self._poll_s > 0:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def reload(self) -> bool:
        """Re-reads the file; True if the new policy is in force."""
        self._seen = self._fingerprint()
        try:
            authenticator = TokenAuthenticator.from_file(self._path)
        except (ValueError, OSError) as error:
            log.error("tokens file not reloaded, the previous one stays in force: %s", error)
            return False
        self._guard.reload(authenticator)
        self.reloads += 1
        log.info("tokens file reloaded: %s", self._path)
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            if self._fingerprint() != self._seen:
                self.reload()

    def _fingerprint(self) -> bytes:
        try:
            return hashlib.sha256(self._path.read_bytes()).digest()
        except OSError:
            return b""
