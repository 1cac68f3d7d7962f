"""Adapter administration whose caller gives up (a deadline passes while the change waits): the
change still runs to its end, the registry agrees with the engine, and the server serves on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from imagegen_client import Adapter, RetryPolicy
from support import START_TIMEOUT_S, StreamWatcher

NO_RETRY = RetryPolicy(max_attempts=1)
GIVES_UP_S = 0.5  # the caller's deadline; the change it asked for waits on the engine longer


def test_a_load_whose_caller_gave_up_completes_and_the_engine_serves_on(
    server_factory: Any, tiny_model: Path
) -> None:
    # The engine is held in its warm-up, so the load waits for it past the caller's deadline.
    server = server_factory(
        wait_ready=False, step_budget=0, adapter_dir=str(tiny_model / "adapters")
    )
    client = server.client(retry=NO_RETRY)
    with pytest.raises(grpc.RpcError) as failure:
        client.load_adapter("ink", timeout_s=GIVES_UP_S)
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    server.batcher.set_step_budget(None)
    assert server.run(server.server.wait_ready(), timeout=START_TIMEOUT_S)
    # One change at a time: this load begins once the abandoned one has ended, and finds it done.
    client.load_adapter("ink", timeout_s=60)
    assert [(a.name, a.loaded, a.unloading) for a in client.list_adapters() if a.loaded] == [
        ("ink", True, False)
    ]
    assert client.generate("after", seed=1, adapters=[Adapter("ink")], timeout_s=60).images
    assert client.health() == "SERVING"


def test_an_unload_whose_caller_gave_up_completes_once_its_holder_finishes(
    server_factory: Any, tiny_model: Path
) -> None:
    server = server_factory(adapter_dir=str(tiny_model / "adapters"))
    client = server.client(retry=NO_RETRY)
    client.load_adapter("ink")
    server.batcher.set_step_budget(0)
    holder = StreamWatcher(client, "holds ink", seed=1, adapters=[Adapter("ink")])
    holder.queued()
    with pytest.raises(grpc.RpcError) as failure:
        client.unload_adapter("ink", timeout_s=GIVES_UP_S)  # waits for the holder
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    server.batcher.set_step_budget(None)
    assert holder.completed().result.images
    # This unload begins once the abandoned one has ended: nothing is left to unload.
    with pytest.raises(grpc.RpcError) as failure:
        client.unload_adapter("ink", timeout_s=60)
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    assert client.server_info().adapters == ()
    client.load_adapter("ink")  # and it loads and serves again
    assert client.generate("again", seed=1, adapters=[Adapter("ink")], timeout_s=60).images
