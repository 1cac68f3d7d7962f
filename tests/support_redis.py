"""A real redis-server for the quota store's tests: Debian's package, installed into .tools by
`make tools` (scripts/install-tools.sh). It listens on a Unix socket only (no port to race for)
and keeps nothing on disk; the test that starts it stops it."""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]


def redis_binary() -> str:
    """The redis-server to run: .tools/bin's wrapper, else one on PATH; skips without one."""
    local = REPOSITORY / ".tools" / "bin" / "redis-server"
    found = str(local) if local.exists() else shutil.which("redis-server")
    if found is None:
        pytest.skip("redis-server is not installed; `make tools` installs it into .tools")
    return found


class RedisServer:
    def __init__(self, directory: Path) -> None:
        self.socket = directory / "redis.sock"
        self.process = subprocess.Popen(
            [
                redis_binary(),
                "--port", "0",
                "--unixsocket", str(self.socket),
                "--save", "",
                "--appendonly", "no",
                "--dir", str(directory),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        self._wait_ready()

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def _wait_ready(self) -> None:
        """Reads its log until it accepts connections (it exits, closing it, if it cannot)."""
        assert self.process.stdout is not None
        log = []
        for line in self.process.stdout:
            log.append(line)
            if "ready to accept connections" in line.lower():
                # Keep reading, so that a full pipe never blocks it.
                threading.Thread(target=self.process.stdout.read, daemon=True).start()
                return
        self.stop()
        raise RuntimeError("redis-server did not start:\n" + "".join(log[-20:]))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
