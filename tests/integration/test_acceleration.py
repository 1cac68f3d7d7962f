"""The fast paths on CPU: the compiled transformer, random weights drawn at load time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from imagegen_client import Adapter, OutputFormat
from support import ALL_ROWS, StreamWatcher, assert_same_image, pixels

NPY = OutputFormat.NPY
BIN = Path(sys.executable).parent


def mixed_batch_images(server: Any) -> list[np.ndarray]:
    """Requests that make the batch 1, then 3, then 4 rows, then shrink as they finish."""
    client = server.client()
    first = StreamWatcher(client, "the first", seed=1, steps=8, output_format=NPY)
    first.queued()
    server.batcher.set_step_budget(2)
    first.step(2)
    second = [
        StreamWatcher(client, f"joins {i}", seed=2 + i, steps=4, output_format=NPY)
        for i in range(2)
    ]
    for watcher in second:
        watcher.queued()
    server.batcher.set_step_budget(1)
    first.step(3)
    last = StreamWatcher(
        client, "a longer prompt that joins last of all", seed=9, steps=4, output_format=NPY
    )
    last.queued()
    server.batcher.set_step_budget(None)
    return [pixels(watcher.completed().result) for watcher in [first, *second, last]]


MIXED_BATCH_SETTINGS: dict[str, Any] = {
    "step_budget": 0,
    "max_batch_size": 4,
    "max_num_images": 1,
    **ALL_ROWS,
}


@pytest.fixture(scope="module")
def eager_mixed_batch_images(tiny_model: Path) -> list[np.ndarray]:
    from support import start_server

    server = start_server(tiny_model, **MIXED_BATCH_SETTINGS)
    try:
        return mixed_batch_images(server)
    finally:
        server.stop()


@pytest.mark.parametrize(
    "compile_settings",
    [
        {"compile": "buckets", "compile_buckets": [2, 4]},  # regional: each block compiled
        {"compile": "dynamic"},
        {"compile": "buckets", "compile_buckets": [2, 4], "compile_scope": "model"},
    ],
    ids=["buckets-blocks", "dynamic-blocks", "buckets-model"],
)
def test_the_compiled_transformer_gives_the_eager_images_as_the_batch_changes(
    server_factory: Any,
    eager_mixed_batch_images: list[np.ndarray],
    compile_settings: dict[str, Any],
) -> None:
    import torch
    from torch._dynamo.utils import counters

    # Compiled graphs live on the code objects, shared by every server in this process: start
    # each setting from none, so it compiles (and is checked) on its own.
    torch._dynamo.reset()
    compiled = server_factory(**compile_settings, **MIXED_BATCH_SETTINGS)
    assert compiled.metrics()["imagegen_compile_seconds"] > 0
    graphs = counters["stats"]["unique_graphs"]
    compiled_images = mixed_batch_images(compiled)
    # Every shape the batch took was compiled at start-up: serving never waits for the compiler.
    assert counters["stats"]["unique_graphs"] == graphs
    for compiled_image, eager_image in zip(compiled_images, eager_mixed_batch_images, strict=True):
        assert_same_image(compiled_image, eager_image)


def adapter_batch_images(server: Any) -> list[np.ndarray]:
    """One batch of three requests: no adapter, a Kohya one, and it with a PEFT one."""
    client = server.client()
    watchers = [
        StreamWatcher(client, "a fox", seed=1, steps=4, output_format=NPY, adapters=adapters)
        for adapters in ([], [Adapter("ink")], [Adapter("ink", 0.5), Adapter("neon")])
    ]
    for watcher in watchers:
        watcher.queued()
    server.batcher.set_step_budget(None)
    return [pixels(watcher.completed().result) for watcher in watchers]


def test_adapters_never_make_the_compiled_transformer_compile_while_serving(
    server_factory: Any, tiny_model: Path
) -> None:
    import torch
    from torch._dynamo.utils import counters

    settings = {
        "adapter_dir": str(tiny_model / "adapters"),
        "preload_adapters": ["ink", "neon"],
        "step_budget": 0,
        "max_batch_size": 4,
        "max_num_images": 1,
        **ALL_ROWS,
    }
    eager = adapter_batch_images(server_factory(**settings))
    torch._dynamo.reset()
    # One batch bucket that holds the whole batch: a graph per text bucket, adapters off and
    # on, compiled at start-up. With a cold cache the test takes about 55 s this way; with
    # dynamic shapes it took over 95 s.
    compiled = server_factory(compile="buckets", compile_buckets=[4], **settings)
    graphs = counters["stats"]["unique_graphs"]
    images = adapter_batch_images(compiled)
    # Then no adapter at all, at a text bucket the warm-up did not use (512 tokens): after the
    # adapters-active variant, the wrapped layers run as frames of their own.
    compiled.client().generate("a fox in the snow " * 11, seed=2, steps=2)
    # The variant with adapters active was compiled at start-up, and the adapters' deltas run
    # outside the graphs: no mix of adapters, ranks or rows is a new graph.
    assert counters["stats"]["unique_graphs"] == graphs
    for compiled_image, eager_image in zip(images, eager, strict=True):
        assert_same_image(compiled_image, eager_image)
    assert float(np.abs(images[0] - images[1]).max()) > 1e-3  # the adapter did change the image


def test_weights_drawn_at_load_serve_deterministic_images(
    server_factory: Any, tmp_path: Path
) -> None:
    model = tmp_path / "at-load"
    subprocess.run(
        [str(BIN / "imagegen-server"), "tiny-model", str(model), "--weights-at-load"],
        check=True,
        capture_output=True,
    )
    assert not list(model.rglob("*.safetensors"))  # configs only
    images = []
    for _ in range(2):
        server = server_factory(model=str(model))
        images.append(pixels(server.client().generate("drawn at load", seed=3, output_format=NPY)))
    assert np.isfinite(images[0]).all()
    assert_same_image(images[1], images[0])


def test_the_full_size_model_is_refused_on_cpu(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "imagegen-server"), "tiny-model", str(tmp_path / "full"), "--preset", "full"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "needs" not in result.stdout and "CUDA device" in result.stderr


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"compile": "eager"}, "compile"),
        ({"compile_scope": "layers"}, "compile_scope"),
        (
            {"compile": "buckets", "compile_buckets": [1, 2]},
            "compile_buckets must reach max_batch_size",
        ),
        ({"memory_reserve_fraction": 1.5}, "memory_reserve_fraction"),
        (
            {"compile": "dynamic", "compile_scope": "model"},
            "compile=dynamic needs compile_scope=blocks",
        ),
    ],
)
def test_acceleration_settings_are_checked(overrides: dict[str, Any], message: str) -> None:
    from imagegen_server.base.config import load_settings
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        load_settings(model="m", **overrides)
