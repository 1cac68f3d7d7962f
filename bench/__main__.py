"""`python -m bench COMMAND`: every benchmark (bench/cli.py)."""

from __future__ import annotations

import signal
from types import FrameType

from .cli import main


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


# A SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so `finally` blocks stop the servers.
signal.signal(signal.SIGTERM, _exit_on_sigterm)
raise SystemExit(main())
