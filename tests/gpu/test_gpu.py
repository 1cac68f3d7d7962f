"""On a CUDA device: the full-size stand-in in bfloat16, the memory probe, compiled vs eager."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from imagegen_client import OutputFormat
from support import pixels

# Drawing the 20 B-parameter stand-in, the start-up probe and compiling run in a test's fixture
# set-up, which the suite's 300 s per-test timeout would cut; a GPU command may run 600 s.
# scripts/gpu-check.sh bounds each test tighter, to fit its 9-minute run.
pytestmark = pytest.mark.timeout(float(os.environ.get("IMAGEGEN_GPU_TEST_TIMEOUT_S", "600")))
GPU = {
    "device": "cuda",
    "dtype": "bfloat16",
    "min_width": 256,
    "min_height": 256,
    "default_width": 1024,
    "default_height": 1024,
    "max_width": 1328,
    "max_height": 1328,
    "default_steps": 8,
}
NPY = OutputFormat.NPY


@pytest.fixture(scope="module")
def full_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("full")
    # `python -m`: the GPU machine runs the checkout without installing its scripts.
    command = [sys.executable, "-m", "imagegen_server.main", "tiny-model", str(directory)]
    subprocess.run([*command, "--preset", "full"], check=True)
    return directory


@pytest.fixture(scope="module")
def full_server(full_model: Path) -> Any:
    from support import start_server

    running = start_server(full_model, **GPU)
    yield running
    running.stop()


def test_the_full_size_stand_in_serves_1024_images_in_bf16(full_server: Any) -> None:
    info = full_server.client().server_info()
    assert info.device.startswith("cuda") and info.dtype == "bfloat16"
    result = full_server.client().generate(
        "a lighthouse", seed=1, output_format=OutputFormat.NPY, timeout_s=600
    )
    image = pixels(result)
    assert image.shape == (1024, 1024, 3) and np.isfinite(image).all()


def test_the_memory_probe_caps_batches_and_reports_them(full_server: Any) -> None:
    info = full_server.client().server_info()
    limits = {
        (limit.width, limit.height): limit.max_batch_size for limit in info.batching.batch_limits
    }
    assert set(limits) == {(1024, 1024), (1328, 1328)}
    assert 1 <= limits[(1328, 1328)] <= limits[(1024, 1024)] <= info.batching.max_batch_size
    metrics = full_server.metrics()
    assert metrics['imagegen_max_batch_size{resolution="1024x1024"}'] == limits[(1024, 1024)]


def test_compiled_bf16_matches_eager_bf16(server_factory: Any, tiny_model: Path) -> None:
    settings = {"device": "cuda", "dtype": "bfloat16"}
    compiled = server_factory(compile="buckets", compile_buckets=[1, 2, 4, 8], **settings)
    eager = server_factory(**settings)
    for server in (compiled, eager):
        server.image = pixels(
            server.client().generate("compiled", seed=2, output_format=OutputFormat.NPY)
        )
    assert float(np.abs(compiled.image - eager.image).max()) < 2e-2  # bfloat16 kernels differ


def test_variants_on_cuda_batch_together_probe_with_their_loras_and_match_alone(
    server_factory: Any, tiny_model: Path
) -> None:
    """The three-variant batch of tests/integration/test_variants.py on the device: the memory
    probe runs with every variant's LoRAs on its rows, and each row of a mixed batch equals the
    same request run alone on the same server."""
    from support import StreamWatcher, variants_config

    server = server_factory(
        device="cuda",
        dtype="float32",
        adapter_dir=str(tiny_model / "adapters"),
        variants=variants_config(tiny_model / "adapters"),
        default_steps=None,
    )
    client = server.client()
    assert server.client().server_info().batching.batch_limits  # the probe ran
    server.batcher.set_step_budget(0)
    names = ("base", "fast", "soft")
    options = {"guidance_scale": 2.0, "negative_prompt": "blurry", "output_format": NPY}
    watchers = [
        StreamWatcher(client, "a fox", seed=seed, variant=name, **options)
        for seed, name in enumerate(names)
    ]
    for watcher in watchers:
        watcher.queued()
    server.batcher.set_step_budget(None)
    mixed = [watcher.completed().result for watcher in watchers]
    assert [result.batch_size for result in mixed] == [3, 3, 3]
    for seed, (name, result) in enumerate(zip(names, mixed, strict=True)):
        alone = pixels(client.generate("a fox", seed=seed, variant=name, **options))
        assert float(np.abs(pixels(result) - alone).max()) < 1e-3  # TF32 kernels by batch size
