"""Start-up edges of a real server process: a signal while it loads, a port already taken."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from .conftest import launch, server_command, server_env


def serve(model: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """`imagegen-server serve` on free ports (unless `flags` name one), run to its exit."""
    return subprocess.run(
        server_command(model, *flags),
        capture_output=True,
        text=True,
        timeout=120,
        env=server_env(),
        check=False,
    )


def test_a_sigterm_while_the_engine_is_still_compiling_exits_zero(tiny_model: Path) -> None:
    # Compiling on CPU takes far longer than the drain's wait for the engine thread, so the
    # server leaves with the engine thread still inside torch.compile.
    server = launch(tiny_model, "--compile", "dynamic")
    server.process.send_signal(signal.SIGTERM)
    assert server.wait(timeout=60) == 0
    log = "".join(server.log)
    assert "drained cleanly" in log and "SERVING" not in log
    assert "engine still busy after the drain; exiting now" in log


def test_a_port_another_server_holds_stops_the_start_with_exit_code_2(tiny_model: Path) -> None:
    holder = launch(tiny_model)
    try:
        for flag in ("--port", "--health-port"):  # the last --port given counts
            second = serve(tiny_model, flag, str(holder.port))
            assert second.returncode == 2 and "cannot start" in second.stderr, second.stderr
            # Nothing was left half started.
            assert "Exception ignored" not in second.stderr, second.stderr
    finally:
        holder.process.terminate()
        holder.wait(60)
