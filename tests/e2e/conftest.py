"""A real `imagegen-server serve` process, as deployments run it, started by the launcher the
benchmarks use (bench/launch.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root holds bench/

from bench.launch import ServerProcess, server_env
from bench.launch import serve_command as server_command

__all__ = ["ServerProcess", "launch", "server_command", "server_env"]

# Small test sizes; flags given to `launch` come later and win.
TEST_FLAGS = (
    "--min-width",
    "32",
    "--min-height",
    "32",
    "--default-width",
    "64",
    "--default-height",
    "64",
    "--default-steps",
    "4",
)


def launch(model: Path, *flags: str) -> ServerProcess:
    """Starts the server on free ports with small test sizes; returns once it listens (model
    still loading)."""
    return ServerProcess.start(server_command(model, *TEST_FLAGS, *flags))


@pytest.fixture(scope="module")
def server_process(tiny_model: Path) -> Iterator[ServerProcess]:
    server = launch(tiny_model)
    try:
        server.wait_serving()
        yield server
    finally:
        server.stop(grace_s=60)
