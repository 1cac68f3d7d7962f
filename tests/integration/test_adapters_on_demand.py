"""Adapters on demand: a request naming an adapter that has a file in --adapter-dir loads it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from imagegen_client import Adapter, OutputFormat, RetryPolicy
from support import StreamWatcher, assert_same_image, pixels
from support import pipeline_image as reference
from test_adapters import pipeline_with

NO_RETRY = RetryPolicy(max_attempts=1)
CONCURRENT = 8


def adapter_loads(server: Any) -> float:
    return server.metrics().get("imagegen_adapter_loads_total", 0.0)


def test_concurrent_first_requests_for_a_cold_adapter_load_it_once_and_match_the_pipeline(
    server_factory: Any, tiny_model: Path
) -> None:
    server = server_factory(adapter_dir=str(tiny_model / "adapters"), step_budget=0)
    assert adapter_loads(server) == 0
    ink = [Adapter("ink", 0.8)]
    watchers = [
        StreamWatcher(
            server.client(),
            f"a fox {seed}",
            seed=seed,
            adapters=ink,
            output_format=OutputFormat.NPY,
        )
        for seed in range(CONCURRENT)
    ]
    for watcher in watchers:
        watcher.queued()  # accepted: its adapter was loaded (or found loaded) first
    assert adapter_loads(server) == 1
    server.batcher.set_step_budget(None)
    results = [watcher.completed().result for watcher in watchers]
    pipeline = pipeline_with(tiny_model, {"ink": 0.8})
    for seed, result in enumerate(results):
        assert_same_image(pixels(result), reference(pipeline, f"a fox {seed}", seed))
    assert adapter_loads(server) == 1


def test_on_demand_loads_evict_the_least_recently_used_idle_adapter(
    server_factory: Any, tiny_model: Path
) -> None:
    server = server_factory(adapter_dir=str(tiny_model / "adapters"), max_loaded_adapters=1)
    client = server.client()
    for name in ("ink", "neon", "ink"):
        client.generate("a hen", seed=1, adapters=[Adapter(name, 1.0)])
    metrics = server.metrics()
    assert metrics["imagegen_adapter_loads_total"] == 3
    assert metrics["imagegen_adapter_evictions_total"] == 2
    assert [adapter.name for adapter in client.server_info().adapters] == ["ink"]


def test_an_adapter_without_a_file_is_not_found(server_factory: Any, tiny_model: Path) -> None:
    server = server_factory(adapter_dir=str(tiny_model / "adapters"))
    client = server.client(retry=NO_RETRY)
    with pytest.raises(grpc.RpcError) as missing:
        client.generate("a hen", adapters=[Adapter("no-such-adapter", 1.0)])
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert "adapters[0].name" in missing.value.details()
    assert adapter_loads(server) == 0
