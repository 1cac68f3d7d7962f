"""Fixtures sorted by what they need: unit tests use none of these; integration tests get a real
server on 127.0.0.1 serving the tiny random-weight model."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from imagegen_server.engine.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def reference_pipeline(tiny_model: Path) -> Any:
    """The plain diffusers pipeline on the same weights: the fidelity reference."""
    return _diffusers_pipeline("QwenImagePipeline", tiny_model)


def _diffusers_pipeline(name: str, model: Path) -> Any:
    """diffusers' pipeline class `name` on `model`'s weights, float32, no progress bars."""
    import diffusers
    import torch

    pipeline = getattr(diffusers, name).from_pretrained(model, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="session")
def picture() -> Any:
    """A smooth gradient with a disc: an init image with structure, 96x80 (the server resizes
    it to the request's size)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:80, 0:96]
    rgb = np.stack([x / 96, y / 80, ((x - 48) ** 2 + (y - 40) ** 2 < 400).astype(float)], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


@pytest.fixture(scope="session")
def mask() -> Any:
    """White (regenerate) in the middle, black (keep) around it, 96x80."""
    from PIL import Image

    image = Image.new("L", (96, 80), 0)
    image.paste(255, (32, 24, 64, 56))
    return image


@pytest.fixture(scope="session")
def img2img(tiny_model: Path) -> Any:
    """diffusers' image-to-image pipeline on the tiny model: the edits' fidelity reference."""
    return _diffusers_pipeline("QwenImageImg2ImgPipeline", tiny_model)


@pytest.fixture(scope="session")
def inpaint(tiny_model: Path) -> Any:
    """diffusers' inpainting pipeline on the tiny model."""
    return _diffusers_pipeline("QwenImageInpaintPipeline", tiny_model)


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[Any]:
    """One server per test module, default test settings."""
    from support import start_server

    running = start_server(tiny_model)
    yield running
    running.stop()


@pytest.fixture
def server_factory(tiny_model: Path) -> Iterator[Any]:
    """Starts servers with setting overrides; stops them after the test."""
    from support import start_server

    started: list[Any] = []

    def start(wait_ready: bool = True, step_budget: int | None = None, **overrides: Any) -> Any:
        model = overrides.pop("model", tiny_model)
        running = start_server(model, wait_ready, step_budget, **overrides)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture(scope="session")
def tiny_edit_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model written as a Qwen-Image-Edit and a Qwen-Image-Edit-Plus checkpoint
    (processor included), by kind: "edit", "edit-plus"."""
    from imagegen_server.engine.tiny_model import write_tiny_model

    return {
        kind: write_tiny_model(tmp_path_factory.mktemp(f"tiny-{kind}"), pipeline_kind=kind)
        for kind in ("edit", "edit-plus")
    }


@pytest.fixture(scope="module")
def edit_plus_server(tiny_edit_models: dict[str, Path]) -> Iterator[Any]:
    """One Qwen-Image-Edit-Plus server per test module, default test settings."""
    from support import start_server

    running = start_server(tiny_edit_models["edit-plus"])
    yield running
    running.stop()
